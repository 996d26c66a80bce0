"""The page in a real headless Chromium (Debian's, driven by Playwright)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Server

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
# Without these Chromium tries to reach Google's services, which this sandbox refuses.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: `python launch.py test` installs it with apt-get")
        pytest.skip(f"{CHROMIUM} not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def open_page(page, url: str) -> None:
    page.goto(url, wait_until="domcontentloaded")
    page.locator("#txt2img_generate").wait_for(state="visible", timeout=60_000)


def next_frames(page) -> None:
    """Let the page draw its next two frames (and the tasks they start)."""
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => setTimeout(r, 50))))")


def set_number(page, elem_id: str, value: int) -> None:
    """Type a number as a user does, and see that it holds.

    A Gradio slider that has just been mounted (its accordion or tab opened a moment ago) sets
    its number box once more from its initial value about 20-30 ms later, in a later task: what
    was typed before that is silently replaced (seen with a DOM event log: `input` v64, then v0
    by the next task). A person never types that fast, a test under load can, which is why the
    outpaint test failed only after other tests had run. So the value is checked once the page
    has had its next frames, and typed again if the mount replaced it."""
    box = page.locator(f"#{elem_id} input[type=number]")
    for _ in range(3):
        box.fill(str(value))
        box.press("Enter")
        next_frames(page)
        if box.input_value() == str(value):
            return
    raise AssertionError(f"#{elem_id} does not keep {value}: it shows {box.input_value()}")


def fill_text(page, selector: str, text: str) -> None:
    """Type into a text box and see that it holds: a box in an accordion opened a moment ago can,
    like a slider (see `set_number`), take its initial value again from a later mount task."""
    box = page.locator(selector).first
    for _ in range(3):
        box.fill(text)
        next_frames(page)
        if box.input_value() == text:
            return
    raise AssertionError(f"{selector} does not keep {text!r}: it shows {box.input_value()!r}")


def wait_for_info(page, tab: str, text: str, timeout: float = 120_000, server: Server | None = None) -> str:
    """Wait until the tab's infotext holds `text`, and return it. On a timeout, say what the page
    showed instead (infotext, error messages, progress) and the end of the server's log, so that a
    failure seen once under load can be explained from CI's output alone."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    info = f"#{tab}_info textarea"
    try:
        page.wait_for_function("([sel, text]) => (document.querySelector(sel)?.value || '').includes(text)",
                               arg=[info, text], timeout=timeout)
    except PlaywrightTimeout:
        shown = page.evaluate("""([sel, tab]) => ({
            infotext: document.querySelector(sel)?.value,
            gallery: document.querySelector(`#${tab}_gallery`)?.innerText,  // progress and previews show there
            toasts: [...document.querySelectorAll('.toast-body, .error')].map(e => e.innerText),
        })""", [info, tab])
        log = server.output()[-4000:] if server else "(no server given)"
        raise AssertionError(f"{tab} infotext never held {text!r} in {timeout / 1000:.0f} s; the page showed "
                             f"{shown!r}\n--- server log (end) ---\n{log}") from None
    return page.locator(info).input_value()


def apply_setting(page, elem_id: str, value: float) -> None:
    """Set a number in the Settings tab and apply it, as a user does."""
    page.get_by_role("tab", name="Settings").click()
    set_number(page, elem_id, value)
    apply_settings(page)


def apply_settings(page) -> None:
    """Press Settings' apply button and wait for its own result."""
    page.locator("#settings_apply").click()
    # the apply button's own result, not any text of the page: "applies" also stands in other
    # controls' descriptions, and a wait satisfied by those raced the save (a CI run under load)
    page.wait_for_function("() => { const t = document.querySelector('#settings_result')?.innerText || '';"
                           " return t.toLowerCase().includes('saved') || t.includes('applies'); }", timeout=30_000)


def small_txt2img(page, prompt: str, steps: int = 2) -> None:
    """The txt2img prompt, and a tiny image: `steps` steps at 64x64."""
    page.locator("#txt2img_prompt textarea").fill(prompt)
    set_number(page, "txt2img_steps", steps)
    set_number(page, "txt2img_width", 64)
    set_number(page, "txt2img_height", 64)


def test_txt2img_in_the_browser(server: Server, browser, tmp_path: Path) -> None:
    page = browser.new_page()
    try:
        open_page(page, server.url)
        tab = page.get_by_role("tab", name="txt2img")
        assert tab.is_visible()
        page.locator("#txt2img_prompt textarea").fill("a lighthouse at night")
        page.locator("#txt2img_neg_prompt textarea").fill("blurry")
        set_number(page, "txt2img_steps", 3)
        set_number(page, "txt2img_width", 64)
        set_number(page, "txt2img_height", 64)
        seed = page.locator("#txt2img_seed input")
        seed.fill("77")
        seed.press("Enter")
        page.locator("#txt2img_generate").click()
        image = page.locator("#txt2img_gallery img").first
        image.wait_for(state="visible", timeout=120_000)
        info = page.locator("#txt2img_info textarea")
        wait_for_info(page, "txt2img", "Seed: 77", timeout=30_000)
        text = info.input_value()
        assert text.startswith("a lighthouse at night\nNegative prompt: blurry\nSteps: 3,")
        assert "Size: 64x64" in text
        # the picture really loaded (not a broken link)
        assert page.evaluate("el => el.naturalWidth", image.element_handle()) == 64
        # the seed buttons: random sets -1, reuse brings back the seed of the image shown
        page.locator("#txt2img_random_seed").click()
        page.wait_for_function("() => document.querySelector('#txt2img_seed input').value === '-1'", timeout=10_000)
        page.locator("#txt2img_reuse_seed").click()
        page.wait_for_function("() => document.querySelector('#txt2img_seed input').value === '77'", timeout=10_000)
        page.screenshot(path=str(tmp_path / "txt2img.png"), full_page=True)
    finally:
        page.close()


def test_checkpoint_dropdown_shows_titles_with_hashes(server: Server, browser) -> None:
    page = browser.new_page()
    try:
        open_page(page, server.url)
        box = page.locator("#checkpoint input")
        page.wait_for_function(
            "() => /\\[[0-9a-f]{10}\\]$/.test(document.querySelector('#checkpoint input')?.value || '')", timeout=30_000
        )
        assert box.input_value().startswith("sd1.safetensors [")
    finally:
        page.close()


def test_pnginfo_reads_an_image_and_sends_its_fields_to_txt2img(server: Server, browser, tmp_path: Path) -> None:
    import hashlib

    from PIL import Image, PngImagePlugin

    h10 = hashlib.sha256((server.data_dir / "models/Stable-diffusion/sd1.safetensors").read_bytes()).hexdigest()[:10]
    text = ("a castle on a hill\nNegative prompt: fog, rain\n"
            f"Steps: 12, Sampler: Euler, Schedule type: Automatic, CFG scale: 5.5, Seed: 4242, Size: 128x96, "
            f"Model hash: {h10}, Model: sd1, Clip skip: 2, Version: v1.10.1")
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", text)
    source = tmp_path / "made-elsewhere.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(source, pnginfo=meta)

    page = browser.new_page()
    try:
        open_page(page, server.url)
        page.get_by_role("tab", name="PNG Info").click()
        page.locator("#pnginfo_image input[type=file]").set_input_files(str(source))
        page.wait_for_function(
            "() => document.querySelector('#pnginfo_text textarea')?.value.includes('Seed: 4242')", timeout=30_000
        )
        assert "a castle on a hill" in page.locator("#pnginfo_table").inner_text()
        page.locator("#pnginfo_send_txt2img").click()
        page.wait_for_function(
            "() => document.querySelector('#txt2img_prompt textarea')?.value === 'a castle on a hill'", timeout=30_000
        )
        assert page.locator("#txt2img_prompt").is_visible()  # switched to the txt2img tab
        values = {
            "negative": page.locator("#txt2img_neg_prompt textarea").input_value(),
            "steps": page.locator("#txt2img_steps input[type=number]").input_value(),
            "width": page.locator("#txt2img_width input[type=number]").input_value(),
            "height": page.locator("#txt2img_height input[type=number]").input_value(),
            "cfg": page.locator("#txt2img_cfg_scale input[type=number]").input_value(),
            "seed": page.locator("#txt2img_seed input").input_value(),
            "clip_skip": page.locator("#txt2img_clip_skip input[type=number]").input_value(),
            "sampler": page.locator("#txt2img_sampler input").input_value(),
            "checkpoint": page.locator("#checkpoint input").input_value(),
        }
        assert values == {
            "negative": "fog, rain", "steps": "12", "width": "128", "height": "96", "cfg": "5.5", "seed": "4242",
            "clip_skip": "2", "sampler": "Euler", "checkpoint": f"sd1.safetensors [{h10}]",
        }
    finally:
        page.close()


def test_token_counter_follows_the_prompt(server: Server, browser) -> None:
    page = browser.new_page()
    try:
        open_page(page, server.url)
        page.locator("#txt2img_prompt textarea").fill("a red cube")
        page.wait_for_function(
            "() => document.querySelector('#txt2img_token_counter')?.innerText.trim() === '3/75'", timeout=60_000
        )
        page.locator("#txt2img_prompt textarea").fill("cat " * 80)
        page.wait_for_function(
            "() => document.querySelector('#txt2img_token_counter')?.innerText.trim() === '80/150'", timeout=30_000
        )
    finally:
        page.close()


def test_inpaint_in_the_browser_then_upscale_in_extras(server: Server, browser, tmp_path: Path) -> None:
    from PIL import Image

    source = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), (30, 120, 200)).save(source)
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    try:
        open_page(page, server.url)
        page.get_by_role("tab", name="img2img").first.click()
        page.get_by_role("tab", name="Inpaint", exact=True).click()
        editor = page.locator("#img2img_inpaint")
        editor.wait_for(state="visible", timeout=30_000)
        empty = editor.get_by_text("Upload an image")
        for attempt in range(3):  # the editor sometimes ignores a file given while it initialises
            page.wait_for_timeout(1000)
            with page.expect_file_chooser() as chooser:  # as a user does: click the empty editor
                empty.click()
            chooser.value.set_files(str(source))
            try:
                empty.wait_for(state="hidden", timeout=10_000)
                break
            except Exception:
                if attempt == 2:
                    raise
        canvas = page.locator("#img2img_inpaint canvas").last
        canvas.wait_for(state="visible", timeout=30_000)
        set_number(page, "img2img_steps", 3)
        set_number(page, "img2img_width", 64)
        set_number(page, "img2img_height", 64)
        page.locator("#img2img_prompt textarea").fill("a red square")
        done = "() => document.querySelector('#img2img_info textarea')?.value.includes('Mask blur')"
        for attempt in range(3):
            page.wait_for_timeout(1500)  # the editor draws the uploaded image before it takes strokes
            box = canvas.bounding_box()
            assert box is not None
            # paint a stroke across the middle of the image
            page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5)
            page.mouse.down()
            for i in range(10):
                page.mouse.move(box["x"] + box["width"] * (0.3 + 0.04 * i), box["y"] + box["height"] * 0.5, steps=2)
            page.mouse.up()
            page.locator("#img2img_generate").click()
            try:
                page.wait_for_function(done, timeout=60_000)
                break
            except Exception:
                page.screenshot(path=str(tmp_path / f"inpaint-fail-{attempt}.png"), full_page=True)
                toasts = page.locator(".toast-body, .toast-wrap, [data-testid='toast-body']").all_inner_texts()
                # a stroke made while the editor is still busy can be lost ("Draw the area ...")
                if attempt == 2:
                    raise AssertionError(f"no inpainting result; messages shown: {toasts}") from None
        page.screenshot(path=str(tmp_path / "inpaint.png"), full_page=True)
        page.locator("#img2img_send_to_extras").click()
        page.locator("#extras_image img").wait_for(state="visible", timeout=30_000)
        set_number(page, "extras_scale", 2)
        page.locator("#extras_generate").click()
        page.wait_for_function(
            "() => document.querySelector('#extras_info textarea')?.value.startsWith('128x128')", timeout=60_000
        )
    finally:
        page.close()


def test_outpaint_in_the_browser(server: Server, browser, tmp_path: Path) -> None:
    from PIL import Image

    source = tmp_path / "small.png"
    Image.new("RGB", (64, 48), (200, 90, 30)).save(source)
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    try:
        open_page(page, server.url)
        page.get_by_role("tab", name="img2img").first.click()
        page.locator("#img2img_image input[type=file]").set_input_files(str(source))
        page.locator("#img2img_image img").first.wait_for(state="visible", timeout=30_000)
        page.locator("#img2img_outpaint").get_by_text("Outpaint").first.click()
        set_number(page, "img2img_outpaint_right", 64)
        set_number(page, "img2img_steps", 2)
        page.locator("#img2img_prompt textarea").fill("a wider view")
        assert page.locator("#img2img_outpaint_right input[type=number]").input_value() == "64"
        info = "() => document.querySelector('#img2img_info textarea')?.value.includes('Size: ')"
        for attempt in range(3):  # an image still uploading when Generate is pressed is not there yet
            page.wait_for_timeout(1000)
            page.locator("#img2img_generate").click()
            try:
                page.wait_for_function(info, timeout=90_000)
                break
            except Exception:
                toasts = page.locator(".toast-body, .toast-wrap, [data-testid='toast-body']").all_inner_texts()
                page.screenshot(path=str(tmp_path / f"outpaint-fail-{attempt}.png"), full_page=True)
                if attempt == 2:
                    raise AssertionError(f"no outpainting result; messages shown: {toasts}") from None
        # the engine grew the canvas: 64 + 64 wide, 48 high, whatever the width/height fields say
        text = page.locator("#img2img_info textarea").input_value()
        assert "Size: 128x48" in text, text
    finally:
        page.close()


def test_lora_card_click_inserts_its_tag(server: Server, browser) -> None:
    from tests.test_lora import SD1_KOHYA, kohya_file

    lora_dir = server.data_dir / "models" / "Lora"
    lora_dir.mkdir(parents=True, exist_ok=True)
    kohya_file(lora_dir / "paper cut.safetensors", SD1_KOHYA)
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    try:
        open_page(page, server.url)
        page.locator("#txt2img_prompt textarea").fill("a fox")
        page.locator("#txt2img_extra_networks").get_by_text("Extra networks").click()
        page.locator("#txt2img_extra_networks_refresh").click()
        card = page.locator("#txt2img_lora_cards img").first
        card.wait_for(state="visible", timeout=30_000)
        card.click()
        page.wait_for_function(
            "() => document.querySelector('#txt2img_prompt textarea')?.value === 'a fox, <lora:paper cut:1>'",
            timeout=30_000,
        )
    finally:
        page.close()


def test_extension_section_assets_and_settings_in_the_browser(browser, tmp_path: Path, checkpoint_store: Path) -> None:
    import textwrap

    from tests.conftest import add_checkpoint, start_server, stop_server

    add_checkpoint(tmp_path, checkpoint_store, "sd1.safetensors")
    folder = tmp_path / "extensions" / "page-tagger"
    (folder / "javascript").mkdir(parents=True)
    (folder / "extension.toml").write_text('name = "page-tagger"\nversion = "0.1"\napi = "1"\n')
    (folder / "javascript" / "hello.js").write_text("window.pageTaggerLoaded = true;\n")
    (folder / "style.css").write_text("#txt2img_ext_page-tagger { outline: 3px solid rgb(1, 2, 3); }\n")
    (folder / "__init__.py").write_text(textwrap.dedent('''
        from pydantic import BaseModel
        from webui.extensions.api import UiSection, hookimpl

        class Args(BaseModel):
            tag: str = ""

        @hookimpl
        def ui_contribution():
            import gradio as gr
            return UiSection(title="Page tagger", args_model=Args,
                             build=lambda: {"tag": gr.Textbox("", label="Tag", elem_id="page_tagger_tag")})

        @hookimpl
        def process_prompt(stage):
            if stage.args.tag:
                stage.infotext["Page tag"] = stage.args.tag
    '''))
    s = start_server(tmp_path)
    page = browser.new_page()
    try:
        open_page(page, s.url)
        assert page.evaluate("() => window.pageTaggerLoaded === true")  # javascript/*.js is in the page
        section = page.locator("#txt2img_ext_page-tagger")
        assert "rgb(1, 2, 3)" in page.evaluate("el => getComputedStyle(el).outlineColor", section.element_handle())
        section.get_by_text("Page tagger").click()
        fill_text(page, "#page_tagger_tag textarea, #page_tagger_tag input", "from-the-page")
        page.locator("#txt2img_prompt textarea").fill("a barn")
        set_number(page, "txt2img_steps", 2)
        set_number(page, "txt2img_width", 64)
        set_number(page, "txt2img_height", 64)
        page.locator("#txt2img_generate").click()
        wait_for_info(page, "txt2img", "Page tag: from-the-page", server=s)
        # Settings tab: switch the image format, apply, generate: the file is a JPEG
        page.get_by_role("tab", name="Settings").click()
        # the runtime the flags chose is shown, read-only
        page.wait_for_function("() => document.querySelector('#settings_runtime')?.innerText.includes('attention=')",
                               timeout=30_000)
        fmt = page.locator("#setting_samples_format input")
        fmt.click()
        page.get_by_role("option", name="jpeg").click()
        apply_settings(page)
        assert '"samples_format": "jpeg"' in (tmp_path / "config.json").read_text()
        page.get_by_role("tab", name="txt2img").click()
        page.locator("#txt2img_generate").click()
        deadline = __import__("time").monotonic() + 120
        while not list((tmp_path / "outputs").rglob("*.jpg")):
            assert __import__("time").monotonic() < deadline
            page.wait_for_timeout(200)
    finally:
        page.close()
        stop_server(s)


def test_first_look_outputs_hints_and_tables_in_the_browser(browser, tmp_path: Path, checkpoint_store: Path) -> None:
    """What a new user sees first: the output gallery is not an upload area, an empty LoRA or
    embeddings tab says which folder to fill, the Extensions table's headers are whole words,
    and PNG Info shows the fields as written (no derived Size-1/Size-2 rows)."""
    from PIL import Image, PngImagePlugin

    from tests.conftest import add_checkpoint, start_server, stop_server
    from webui.ui.extensions_tab import HEADERS

    add_checkpoint(tmp_path, checkpoint_store, "sd1.safetensors")
    s = start_server(tmp_path)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    try:
        open_page(page, s.url)
        for tab in ("txt2img", "img2img"):
            page.get_by_role("tab", name=tab, exact=True).first.click()
            gallery = page.locator(f"#{tab}_gallery")
            gallery.wait_for(state="visible", timeout=10_000)
            text = gallery.inner_text()
            assert "Drop" not in text and "Upload" not in text, text
            assert gallery.locator("input[type=file]").count() == 0
        page.get_by_role("tab", name="txt2img", exact=True).first.click()
        page.locator("#txt2img_extra_networks").get_by_text("Extra networks").click()
        hint = page.locator("#txt2img_lora_empty")
        hint.wait_for(state="visible", timeout=10_000)
        assert str((tmp_path / "models" / "Lora").resolve()) in hint.inner_text()
        page.locator("#txt2img_extra_networks").get_by_role("tab", name="Textual Inversion").click()
        assert str((tmp_path / "models" / "embeddings").resolve()) in page.locator("#txt2img_embedding_empty").inner_text()

        page.get_by_role("tab", name="Extensions").click()
        headers = page.locator("#extensions_table th")
        headers.first.wait_for(state="visible", timeout=10_000)
        # each header's words sit on one line: a word broken in two would make more line boxes
        lines = page.evaluate("""() => [...document.querySelectorAll('#extensions_table th')].flatMap(th => {
            const walk = document.createTreeWalker(th, NodeFilter.SHOW_TEXT); const out = [];
            for (let t = walk.nextNode(); t; t = walk.nextNode()) { if (!t.textContent.trim()) continue;
              const r = document.createRange(); r.selectNodeContents(t);
              const tops = new Set([...r.getClientRects()].filter(x => x.width > 0).map(x => Math.round(x.top)));
              out.push([t.textContent.trim(), tops.size]); }
            return out; })""")
        assert {name for name, _ in lines} >= set(HEADERS), lines
        assert all(n == 1 for name, n in lines if name in HEADERS), lines

        meta = PngImagePlugin.PngInfo()
        meta.add_text("parameters", "a dune\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 128x96")
        source = tmp_path / "dune.png"
        Image.new("RGB", (16, 16)).save(source, pnginfo=meta)
        page.get_by_role("tab", name="PNG Info").click()
        page.locator("#pnginfo_image input[type=file]").set_input_files(str(source))
        page.wait_for_function("() => document.querySelector('#pnginfo_table')?.innerText.includes('128x96')",
                               timeout=30_000)
        table = page.locator("#pnginfo_table").inner_text()
        assert "Size-1" not in table and "Size-2" not in table, table
    finally:
        page.close()
        stop_server(s)


def test_login_page_logs_in_without_revealing_the_app(browser, tmp_path: Path, checkpoint_store: Path) -> None:
    """With --gradio-auth the login page works in a browser although it carries no API description."""
    from tests.conftest import add_checkpoint, start_server, stop_server

    add_checkpoint(tmp_path, checkpoint_store, "sd1.safetensors")
    s = start_server(tmp_path, "--gradio-auth", "ann:secret")
    page = browser.new_page()
    try:
        page.goto(s.url, wait_until="domcontentloaded")
        password = page.locator("input[type=password]")
        password.wait_for(state="visible", timeout=30_000)
        assert page.evaluate("() => window.gradio_api_info") is None
        assert "sd1" not in page.content()
        page.locator("input").first.fill("ann")
        password.fill("secret")
        password.press("Enter")
        page.locator("#txt2img_generate").wait_for(state="visible", timeout=60_000)
        assert "sd1.safetensors" in page.locator("#checkpoint input").input_value()
    finally:
        page.close()
        stop_server(s)


def test_xyz_plot_from_the_script_dropdown(server: Server, browser, tmp_path: Path) -> None:
    """Pick X/Y/Z plot in the Script dropdown, Steps on X with two values: the gallery shows the
    labelled grid first and the info box names the script and its axis."""
    page = browser.new_page()
    try:
        open_page(page, server.url)
        small_txt2img(page, "a windmill", steps=20)
        page.locator("#txt2img_script_section").get_by_text("Script").first.click()
        page.locator("#txt2img_script input").click()
        page.get_by_role("option", name="X/Y/Z plot").click()
        group = page.locator("[id^=txt2img_script_][id$=_x_type]").first
        group.wait_for(state="visible", timeout=30_000)
        assert not page.locator("[id^=txt2img_script_][id$=_loops]").is_visible()
        group.locator("input").click()
        page.get_by_role("option", name="Steps", exact=True).click()
        values = page.locator("[id^=txt2img_script_][id$=_x_values] textarea, [id^=txt2img_script_][id$=_x_values] input")
        values.first.fill("1, 2")
        page.locator("#txt2img_generate").click()
        wait_for_info(page, "txt2img", "X Type: Steps", timeout=120_000)
        # the first gallery picture once its file has loaded (visible comes before loaded)
        size = page.wait_for_function(
            "() => { const i = document.querySelector('#txt2img_gallery img');"
            " return i && i.complete && i.naturalWidth > 0 && [i.naturalWidth, i.naturalHeight]; }",
            timeout=30_000).json_value()
        width, height = size
        assert width == 128 and height > 64  # two 64-px cells side by side, labels above
        assert "Script: X/Y/Z plot" in page.locator("#txt2img_info textarea").input_value()
        page.screenshot(path=str(tmp_path / "xyz.png"), full_page=True)
    finally:
        page.close()


def test_controlnet_unit_from_the_page(browser, tmp_path: Path, checkpoint_store: Path) -> None:
    """Unit 0: upload an image, preview its canny edges, pick the model, enable, generate: the
    infotext records the unit."""
    from PIL import Image

    from tests.conftest import add_checkpoint, start_server, stop_server
    from webui.app import build_engine
    from webui.config import Config
    from webui.testing.make_controlnet import write_controlnet

    add_checkpoint(tmp_path, checkpoint_store, "sd1.safetensors")
    unet = build_engine(Config(data_dir=tmp_path, dtype="float32")).bundle(None).unet
    write_controlnet(tmp_path / "models" / "ControlNet" / "cn_canny.safetensors", unet, strength=0.5)
    source = tmp_path / "square.png"
    image = Image.new("RGB", (64, 64))
    image.paste((255, 255, 255), (16, 16, 48, 48))
    image.save(source)
    s = start_server(tmp_path)
    page = browser.new_page()
    try:
        open_page(page, s.url)
        small_txt2img(page, "a tower")
        page.locator("#txt2img_controlnet").get_by_text("ControlNet").first.click()
        page.locator("#txt2img_cn_0_image input[type=file]").set_input_files(str(source))
        page.locator("#txt2img_cn_0_image img").first.wait_for(state="visible", timeout=30_000)
        page.locator("#txt2img_cn_0_module input").click()
        page.get_by_role("option", name="canny", exact=True).click()
        assert not page.locator("#txt2img_cn_0_preview_button").is_visible()  # until "Allow preview"
        page.locator("#txt2img_cn_0_allow_preview input").check()
        page.locator("#txt2img_cn_0_preview_button").click()
        page.locator("#txt2img_cn_0_preview img").first.wait_for(state="visible", timeout=30_000)
        page.locator("#txt2img_cn_0_model input").click()
        page.get_by_role("option", name="cn_canny", exact=False).first.click()
        page.locator("#txt2img_cn_0_enabled input").check()
        page.locator("#txt2img_generate").click()
        wait_for_info(page, "txt2img", "ControlNet 0", timeout=120_000)
        text = page.locator("#txt2img_info textarea").input_value()
        assert 'ControlNet 0: "Module: canny, Model: cn_canny [' in text
        # the infotext pasted back fills the unit again
        page.locator("#txt2img_cn_0_enabled input").uncheck()
        page.locator("#txt2img_cn_0_module input").click()
        page.get_by_role("option", name="invert", exact=True).click()
        page.locator("#txt2img_prompt textarea").fill(text)
        page.locator("#txt2img_paste").click()
        page.wait_for_function("() => document.querySelector('#txt2img_cn_0_enabled input')?.checked", timeout=30_000)
        assert page.locator("#txt2img_cn_0_module input").input_value() == "canny"
    finally:
        page.close()
        stop_server(s)


def test_token_merging_from_the_settings_tab(browser, tmp_path: Path, checkpoint_store: Path) -> None:
    from tests.conftest import add_checkpoint, start_server, stop_server

    add_checkpoint(tmp_path, checkpoint_store, "sd1.safetensors")
    s = start_server(tmp_path)
    page = browser.new_page()
    try:
        open_page(page, s.url)
        apply_setting(page, "setting_token_merging_ratio", 0.5)
        assert '"token_merging_ratio": 0.5' in (tmp_path / "config.json").read_text()
        page.get_by_role("tab", name="txt2img").click()
        small_txt2img(page, "a harbour")
        page.locator("#txt2img_generate").click()
        wait_for_info(page, "txt2img", "Token merging ratio: 0.5", timeout=120_000)
    finally:
        page.close()
        stop_server(s)


def test_few_step_button_and_step_caching(browser, tmp_path: Path, checkpoint_store: Path) -> None:
    """The ⚡ button fills a Turbo checkpoint's sampler, schedule, steps and CFG and says why;
    step caching set in Settings shows in the infotext."""
    from tests.conftest import add_checkpoint, start_server, stop_server

    add_checkpoint(tmp_path, checkpoint_store, "sd1.safetensors", "sd_turbo.safetensors")
    s = start_server(tmp_path)
    page = browser.new_page()
    try:
        open_page(page, s.url)
        apply_setting(page, "setting_deepcache_interval", 2)
        page.get_by_role("tab", name="txt2img").click()
        page.locator("#txt2img_prompt textarea").fill("a harbour")
        page.locator("#txt2img_few_step").click()
        page.wait_for_function(
            "() => document.querySelector('#txt2img_few_step_note')?.innerText.includes('Turbo')", timeout=30_000)
        assert "guessed from its file name" in page.locator("#txt2img_few_step_note").inner_text()
        assert page.locator("#txt2img_steps input[type=number]").input_value() == "4"
        assert page.locator("#txt2img_sampler input").input_value() == "Euler a"
        set_number(page, "txt2img_width", 64)
        set_number(page, "txt2img_height", 64)
        page.locator("#txt2img_generate").click()
        wait_for_info(page, "txt2img", "DeepCache interval: 2", timeout=120_000)
        text = page.locator("#txt2img_info textarea").input_value()
        assert "Steps: 4" in text and "Sampler: Euler a" in text and "Schedule type: Simple" in text
        assert "CFG scale: 1" in text
    finally:
        page.close()
        stop_server(s)


def test_restore_faces_in_extras_and_over_the_api(browser, tmp_path: Path, checkpoint_store: Path) -> None:
    """GFPGAN (full size, random weights) restores the face of an uploaded image in Extras, and the
    API lists it and restores over HTTP. The server runs spandrel under the torchvision STAND-IN
    (webui.testing.torchvision_stand_in, through its PYTHONPATH): no torchvision matches this torch."""
    import base64
    import io

    import numpy as np
    import requests
    from PIL import Image

    from tests.conftest import add_checkpoint, start_server, stop_server
    from webui.testing.faces import face_scene, write_gfpgan
    from webui.testing.torchvision_stand_in import torchvision_stand_in, write_package

    add_checkpoint(tmp_path, checkpoint_store, "sd1.safetensors")
    with torchvision_stand_in():
        write_gfpgan(tmp_path / "models" / "GFPGAN" / "GFPGANv1.4.safetensors")
    scene_path = tmp_path / "scene.png"
    face_scene().save(scene_path)
    s = start_server(tmp_path, "--api", python_path=write_package(tmp_path / "stand-in"))
    page = browser.new_page()
    try:
        listed = requests.get(s.url + "/sdapi/v1/face-restorers", timeout=30).json()
        assert [r["name"] for r in listed] == ["GFPGAN"] and listed[0]["cmd_dir"].endswith("GFPGAN")
        body = {"image": base64.b64encode(scene_path.read_bytes()).decode(), "upscaler_1": "None",
                "upscaling_resize": 1, "gfpgan_visibility": 1}
        answer = requests.post(s.url + "/sdapi/v1/extra-single-image", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        restored = Image.open(io.BytesIO(base64.b64decode(answer.json()["image"]))).convert("RGB")
        assert not np.array_equal(np.asarray(restored), np.asarray(face_scene()))
        assert "GFPGAN visibility: 1" in answer.json()["html_info"]
        open_page(page, s.url)
        page.get_by_role("tab", name="Extras").click()
        page.locator("#extras_image input[type=file]").set_input_files(str(scene_path))
        set_number(page, "extras_gfpgan_visibility", 1)
        page.locator("#extras_generate").click()
        wait_for_info(page, "extras", "saved as", timeout=120_000)
        saved = sorted((tmp_path / "outputs" / "extras-images").rglob("*.png"))
        assert saved, "the Extras result was not saved"
        assert "GFPGAN visibility: 1" in Image.open(saved[-1]).info.get("parameters", "")
        assert page.locator("#extras_note").inner_text().strip() == ""  # spandrel imports: nothing to warn of
    finally:
        page.close()
        stop_server(s)


def test_interrogate_tagger_and_clip_fill_the_img2img_prompt(browser, tmp_path: Path, checkpoint_store: Path) -> None:
    from PIL import Image

    from tests.conftest import add_checkpoint, start_server, stop_server
    from tests.test_interrogate import write_tagger
    from webui.testing.captioners import write_blip, write_clip

    add_checkpoint(tmp_path, checkpoint_store, "sd1.safetensors")
    write_tagger(tmp_path / "models" / "interrogators" / "wd-tiny")
    write_blip(tmp_path / "models" / "BLIP" / "blip-tiny")
    write_clip(tmp_path / "models" / "clip_interrogate" / "clip-tiny")
    source = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (255, 0, 0)).save(source)
    s = start_server(tmp_path)
    page = browser.new_page()
    try:
        open_page(page, s.url)
        page.get_by_role("tab", name="img2img").first.click()
        page.locator("#img2img_image input[type=file]").set_input_files(str(source))
        page.locator("#img2img_image img").first.wait_for(state="visible", timeout=30_000)
        page.locator("#img2img_interrogate_tagger").click()
        page.wait_for_function(
            "() => document.querySelector('#img2img_prompt textarea')?.value.startsWith('red background')",
            timeout=60_000)
        page.locator("#img2img_interrogate_clip").click()
        page.wait_for_function(
            "() => document.querySelector('#img2img_prompt textarea')?.value.includes(', by ')", timeout=60_000)
    finally:
        page.close()
        stop_server(s)


def test_two_workers_the_page_shows_which_one_runs_the_job(browser, tmp_path: Path, checkpoint_store: Path) -> None:
    """With two CPU workers the progress says which one runs the job, and Settings lists both."""
    from tests.conftest import add_checkpoint, start_server, stop_server

    add_checkpoint(tmp_path, checkpoint_store, "sd1.safetensors")
    s = start_server(tmp_path, "--use-cpu", "--workers", "2")
    page = browser.new_page()
    try:
        open_page(page, s.url)
        small_txt2img(page, "a harbour", steps=150)
        page.locator("#txt2img_generate").click()
        page.wait_for_function("() => /Step \\d+\\/150 on cpu\\/[01]/.test(document.body.innerText)", timeout=120_000)
        wait_for_info(page, "txt2img", "Steps: 150", timeout=300_000)
        page.get_by_role("tab", name="Settings").click()
        runtime = page.locator("#settings_runtime")
        runtime.wait_for(state="visible", timeout=30_000)
        text = runtime.inner_text()
        assert "cpu/0: device=cpu" in text and "cpu/1: device=cpu" in text, text
    finally:
        page.close()
        stop_server(s)


def test_flux_controls_follow_the_checkpoint_and_generate(browser, tmp_path: Path, checkpoint_store: Path) -> None:
    """Distilled CFG Scale and Shift are on the page only for a model that takes them, and the
    sampler list holds only what the model can use: choosing Flux dev shows the two and shortens
    the list, choosing SD 1.x hides them and gives every sampler back; a Flux generation from the
    page writes the distilled scale typed there and the CLIP-L chosen in "VAE / Text encoder"; that
    choice with SD 1.x is refused with what to do."""
    from safetensors.torch import save_file

    from tests.conftest import add_checkpoint, start_server, stop_server
    from webui.testing.make_flux import tiny_parts, write_flux

    add_checkpoint(tmp_path, checkpoint_store, "sd1.safetensors")
    write_flux(tmp_path / "models", name="flux1-dev", seed=1)
    clip = {k: v.contiguous() for k, v in tiny_parts(seed=5).clip_l.state_dict().items() if "position_ids" not in k}
    save_file(clip, str(tmp_path / "models" / "text_encoder" / "ViT-L-14-detail.safetensors"))
    s = start_server(tmp_path)
    page = browser.new_page()
    try:
        open_page(page, s.url)
        distilled = page.locator("#txt2img_distilled_cfg_scale")

        def choose(name: str) -> None:
            page.locator("#checkpoint input").click()
            page.get_by_role("option", name=name, exact=False).first.click()

        choose("sd1")
        distilled.wait_for(state="hidden", timeout=30_000)
        page.locator("#txt2img_sampler input").click()
        assert page.get_by_role("option", name="DPM++ 2M SDE", exact=True).count() == 1  # SD 1.x: every sampler
        page.keyboard.press("Escape")
        choose("flux1-dev")
        distilled.wait_for(state="visible", timeout=30_000)
        page.locator("#txt2img_sampler input").click()  # Flux: only the samplers it can use
        page.get_by_role("option", name="DPM++ 2M", exact=True).wait_for(state="visible", timeout=10_000)
        assert page.get_by_role("option", name="DPM++ 2M SDE", exact=True).count() == 0
        assert page.locator("#txt2img_sampler input").input_value() == "Euler a"  # allowed there: kept
        page.keyboard.press("Escape")
        page.locator("#txt2img_sampler_options").click()  # the accordion holding Shift
        page.locator("#txt2img_shift").wait_for(state="visible", timeout=30_000)
        small_txt2img(page, "a harbour at dawn")
        set_number(page, "txt2img_cfg_scale", 1)
        set_number(page, "txt2img_distilled_cfg_scale", 5)
        # a file put in the folder while the page is open is offered after Refresh
        save_file(clip, str(tmp_path / "models" / "text_encoder" / "clip_l-later.safetensors"))
        page.locator("#refresh_checkpoints").click()
        page.locator("#modules input").click()
        page.get_by_role("option", name="clip_l-later.safetensors").wait_for(state="visible", timeout=30_000)
        page.get_by_role("option", name="ViT-L-14-detail.safetensors").click()
        page.keyboard.press("Escape")
        page.locator("#txt2img_generate").click()
        text = wait_for_info(page, "txt2img", "Distilled CFG Scale: 5", timeout=120_000, server=s)
        assert "Model: flux1-dev" in text and "Module 2: ViT-L-14-detail" in text, text
        choose("sd1")
        distilled.wait_for(state="hidden", timeout=30_000)
        page.locator("#txt2img_generate").click()  # the CLIP-L file is still chosen: SD 1.x takes none
        page.get_by_text("remove it from 'VAE / Text encoder'").first.wait_for(state="visible", timeout=60_000)
    finally:
        page.close()
        stop_server(s)


def test_opening_sampler_parameters_changes_nothing(server: Server, browser) -> None:
    """Merely opening "Sampler parameters" leaves the sampler's defaults (its boxes once sent 0:
    Euler a without noise); a value typed there reaches the infotext."""
    page = browser.new_page()
    try:
        open_page(page, server.url)
        page.locator("#txt2img_sampler_options").click()
        page.locator("#txt2img_eta input, #txt2img_eta textarea").first.wait_for(state="visible", timeout=30_000)
        small_txt2img(page, "a quiet bay")
        info = page.locator("#txt2img_info textarea")
        before = info.input_value()
        page.locator("#txt2img_generate").click()
        page.wait_for_function(f"() => (document.querySelector('#txt2img_info textarea')?.value || '') !== {before!r}"
                               " && document.querySelector('#txt2img_info textarea').value.includes('a quiet bay')",
                               timeout=120_000)
        text = info.input_value()
        assert "Sampler: Euler a" in text and "Eta" not in text and "Sigma noise" not in text, text
        page.locator("#txt2img_eta input, #txt2img_eta textarea").first.fill("0.5")
        page.locator("#txt2img_generate").click()
        wait_for_info(page, "txt2img", "Eta: 0.5", timeout=120_000)
    finally:
        page.close()
