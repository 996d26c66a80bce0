"""The prompt language in the engine, on tiny models: chunks, emphasis, BREAK, clip skip,
prompt editing and AND in the sampling loop, styles, LoRA tags and embeddings, infotext."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_lora import SD1_KOHYA, kohya_file
from webui.app import Engine, build_engine
from webui.config import Config
from webui.infotext import parse_infotext
from webui.models.errors import ModelError
from webui.pipeline.request import GenerationRequest
from webui.prompts.encode import TextConditioner, chunk_prompt
from webui.prompts.styles import Style


def req(**kw) -> GenerationRequest:
    base = dict(prompt="a red cube on a table", steps=6, width=64, height=64, seed=42, sampler_name="Euler", save_images=False)
    base.update(kw)
    return GenerationRequest(**base)


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


@pytest.fixture
def engine(data_dir: Path) -> Engine:
    return build_engine(Config(data_dir=data_dir, dtype="float32"))


def conditioner(engine: Engine, clip_skip: int = 1, embeddings=()) -> TextConditioner:
    return TextConditioner(engine.bundle("sd1"), clip_skip, embeddings)


# --- chunks and emphasis -------------------------------------------------------------------


def test_chunk_count_grows_by_75_tokens(engine: Engine) -> None:
    tok = engine.bundle("sd1").text_encoders[0].tokenizer
    assert len(chunk_prompt(tok, "")) == 1
    assert len(chunk_prompt(tok, "cat " * 75)) == 1
    assert len(chunk_prompt(tok, "cat " * 76)) == 2
    c = conditioner(engine)
    assert c.encode("cat " * 76).context.shape[0] == 2 * 77
    assert engine.count_tokens("a cat") == (2, 75)
    assert engine.count_tokens("cat " * 80) == (80, 150)


def test_comma_backtracking_keeps_the_phrase_together(engine: Engine) -> None:
    tok = engine.bundle("sd1").text_encoders[0].tokenizer
    # 70 tokens, a comma, then a 10-token phrase: the phrase moves whole into chunk 2
    text = "cat " * 70 + ", " + "dog " * 10
    chunks = chunk_prompt(tok, text)
    assert len(chunks) == 2
    assert len(chunks[0].tokens) == 71 and len(chunks[1].tokens) == 10


def test_break_starts_a_new_chunk(engine: Engine) -> None:
    tok = engine.bundle("sd1").text_encoders[0].tokenizer
    assert len(chunk_prompt(tok, "a cat BREAK a dog")) == 2
    assert conditioner(engine).encode("a cat BREAK a dog").context.shape[0] == 2 * 77


def test_emphasis_changes_the_embedding_and_keeps_its_mean(engine: Engine) -> None:
    c = conditioner(engine)
    plain = c.encode("a red cube").context
    strong = c.encode("a (red:1.5) cube").context
    assert not torch.allclose(plain, strong)
    assert torch.allclose(plain.mean(), strong.mean(), atol=1e-5)
    # equal-weight brackets that cancel give back the plain text
    assert torch.allclose(c.encode("a [(red)] cube").context, plain, atol=1e-5)


def test_clip_skip_uses_an_earlier_layer(engine: Engine) -> None:
    one = conditioner(engine, 1).encode("a red cube").context
    two = conditioner(engine, 2).encode("a red cube").context
    assert not torch.allclose(one, two)
    a = engine.runner.generate(req()).images[0]
    b = engine.runner.generate(req(clip_skip=2))
    assert np.abs(pixels(a) - pixels(b.images[0])).mean() > 0.5
    assert parse_infotext(b.infotexts[0])["Clip skip"] == "2"


def test_identical_texts_are_encoded_once_per_job(engine: Engine) -> None:
    c = conditioner(engine)
    c.batch(["a cat", "a cat", ""])
    c.batch(["a cat", ""])
    assert sorted(c._cache) == ["", "a cat"]


# --- the sampling loop ---------------------------------------------------------------------


def test_prompt_editing_switches_text_mid_run(engine: Engine) -> None:
    """The conditioning follows the schedule step by step; the image equals neither prompt alone."""
    from webui.pipeline.conditioning import ScheduledConditioning, plan_prompts

    c = conditioner(engine)
    sc = ScheduledConditioning(c, plan_prompts(["a [red:blue:3] cube"], [""], 6), guided=True)
    red, blue = c.encode("a red cube").context, c.encode("a blue cube").context
    assert all(torch.equal(sc.at(step).context[0], red) for step in (1, 2, 3))
    assert all(torch.equal(sc.at(step).context[0], blue) for step in (4, 5, 6))
    edited = pixels(engine.runner.generate(req(prompt="a [red:blue:1] cube")).images[0])
    red_img = pixels(engine.runner.generate(req(prompt="a red cube")).images[0])
    blue_img = pixels(engine.runner.generate(req(prompt="a blue cube")).images[0])
    same = pixels(engine.runner.generate(req(prompt="a [red:red:3] cube")).images[0])
    assert np.array_equal(same, red_img)
    assert not np.array_equal(edited, red_img) and not np.array_equal(edited, blue_img)


def test_and_combines_sub_prompts(engine: Engine) -> None:
    red = pixels(engine.runner.generate(req(prompt="a red cube")).images[0])
    both = pixels(engine.runner.generate(req(prompt="a red cube AND a blue ball")).images[0])
    zero = pixels(engine.runner.generate(req(prompt="a red cube AND a blue ball :0")).images[0])
    assert np.abs(both - red).mean() > 0.5
    assert np.abs(zero - red).max() <= 1  # a sub-prompt of weight 0 contributes nothing


# --- styles, LoRA, embeddings ----------------------------------------------------------------


def test_styles_are_applied_and_unknown_style_is_an_error(engine: Engine) -> None:
    engine.styles.save(Style("cinematic", "{prompt}, cinematic lighting", "cartoon"))
    styled = engine.runner.generate(req(styles=("cinematic",)))
    fields = parse_infotext(styled.infotexts[0])
    assert fields["Prompt"] == "a red cube on a table, cinematic lighting"
    assert fields["Negative prompt"] == "cartoon"
    with pytest.raises(ModelError, match="style 'nope' not found"):
        engine.runner.generate(req(styles=("nope",)))


def test_lora_tag_applies_for_one_job_and_records_its_hash(data_dir: Path) -> None:
    lora_dir = data_dir / "models" / "Lora"
    lora_dir.mkdir(parents=True)
    kohya_file(lora_dir / "film grain.safetensors", SD1_KOHYA, alpha=8.0)
    engine = build_engine(Config(data_dir=data_dir, dtype="float32"))
    before = pixels(engine.runner.generate(req()).images[0])
    state = {k: v.clone() for k, v in engine.bundle("sd1").unet.state_dict().items()}
    with_lora = engine.runner.generate(req(prompt="a red cube on a table <lora:film grain:1.5>"))
    after = pixels(engine.runner.generate(req()).images[0])
    assert np.abs(pixels(with_lora.images[0]) - before).mean() > 0.5
    assert np.array_equal(before, after), "the LoRA leaked into the next job"
    assert all(torch.equal(state[k], v) for k, v in engine.bundle("sd1").unet.state_dict().items())
    fields = parse_infotext(with_lora.infotexts[0])
    h12 = engine.networks.find_lora("film grain").short_hash(engine.registry.hashes)
    assert fields["Lora hashes"] == f"film grain: {h12}" and len(h12) == 12
    assert "<lora:" not in fields["Prompt"]  # tags never reach the text encoder
    with pytest.raises(ModelError, match="LoRA 'missing' not found"):
        engine.runner.generate(req(prompt="x <lora:missing:1>"))


def test_embedding_in_the_prompt_changes_the_conditioning(data_dir: Path) -> None:
    from safetensors.torch import save_file

    emb_dir = data_dir / "models" / "embeddings"
    emb_dir.mkdir(parents=True)
    save_file({"emb_params": torch.randn(3, 32)}, emb_dir / "shiny-style.safetensors")
    engine = build_engine(Config(data_dir=data_dir, dtype="float32"))
    plain = engine.runner.generate(req(prompt="a cube, style")).images[0]
    used = engine.runner.generate(req(prompt="a cube, shiny-style"))
    assert np.abs(pixels(plain) - pixels(used.images[0])).mean() > 0.5
    tok = engine.bundle("sd1").text_encoders[0].tokenizer
    embeddings = engine._model_side().embeddings.find_in_prompt("shiny-style")
    # a 3-vector embedding near a chunk's end moves whole into the next chunk
    chunks = chunk_prompt(tok, "cat " * 74 + "shiny-style", embeddings)
    assert [len(c.tokens) for c in chunks] == [74, 3]
    assert engine.count_tokens("a shiny-style") == (4, 75)
    assert parse_infotext(used.infotexts[0])["TI hashes"].startswith("shiny-style: ")


def test_an_embedding_only_a_later_batch_uses_is_applied_there(data_dir: Path) -> None:
    """Prompts may change per batch (wildcards): the second batch's embedding is looked up and
    used for it, not only the first batch's."""
    from safetensors.torch import save_file

    from tests.test_extensions import write_extension

    emb_dir = data_dir / "models" / "embeddings"
    emb_dir.mkdir(parents=True)
    save_file({"emb_params": torch.randn(3, 32)}, emb_dir / "shiny-style.safetensors")
    write_extension(data_dir, "later", '''
        @hookimpl
        def process_prompt(stage):
            if stage.batch_index == 1:
                stage.prompts = [p + ", shiny-style" for p in stage.prompts]
    ''')
    engine = build_engine(Config(data_dir=data_dir, dtype="float32"))
    both = engine.runner.generate(req(prompt="a cube", n_iter=2))
    assert "TI hashes" not in parse_infotext(both.infotexts[0])
    assert parse_infotext(both.infotexts[1])["TI hashes"].startswith("shiny-style: ")
    alone = engine.runner.generate(req(prompt="a cube, shiny-style", seed=both.seeds[1],
                                       extensions={"later": {}}))  # batch 0 here: the prompt is as given
    assert np.array_equal(pixels(both.images[1]), pixels(alone.images[0]))
