"""Infotext: parsing text A1111 1.x writes, round trips of what we write, and the mapping to
request fields used by "Send to txt2img" and paste."""

from __future__ import annotations

import pytest

from webui.infotext import format_infotext, infotext_to_fields, parse_infotext, split_sampler_name
from webui.pipeline.request import GenerationRequest

# --- realistic A1111 1.x infotexts (written out by hand) ----------------------------------------

FULL = (
    "masterpiece, best quality, 1girl, (film grain:1.2), <lora:film:0.8>, <lora:grain:0.5>\n"
    "detailed background, cinematic lighting\n"
    "Negative prompt: bad-hands, (worst quality:1.4), lowres\n"
    "blurry, jpeg artifacts\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, "
    "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, "
    "VAE: vae-ft-mse-840000-ema-pruned.safetensors, Variation seed: 5, Variation seed strength: 0.3, "
    "Denoising strength: 0.45, Clip skip: 2, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent, "
    'Lora hashes: "film: 0123456789ab, grain: ba9876543210", TI hashes: "bad-hands: 0123456789ab", '
    "Emphasis: Original, RNG: CPU, Version: v1.10.1"
)

# 1.6-era: sampler and schedule in one name, fixed hires size, ADetailer, ControlNet JSON values
OLDER = (
    "portrait of an old sailor, dramatic light\n"
    "Negative prompt: (deformed, distorted:1.3)\n"
    "Steps: 30, Sampler: DPM++ 2M SDE Karras, CFG scale: 5, Seed: 42, Size: 512x512, "
    "Model hash: a1b2c3d4e5, Model: realisticVision_v51, Denoising strength: 0.5, "
    "Hires resize: 1024x1536, Hires steps: 15, Hires upscaler: R-ESRGAN 4x+, "
    "ADetailer model: face_yolov8n.pt, ADetailer confidence: 0.3, ADetailer mask blur: 4, "
    'ADetailer prompt: "close-up face, detailed eyes", ADetailer version: 24.1.2, '
    'ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1, '
    'Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: 100, Threshold B: 200, '
    'Guidance Start: 0, Guidance End: 1, Pixel Perfect: False, Control Mode: Balanced", '
    'Wildcard prompt: "a \\"quoted\\" word,\\nsecond line", Version: v1.6.0'
)


def test_parses_a_full_a1111_infotext() -> None:
    p = parse_infotext(FULL)
    assert p["Prompt"] == (
        "masterpiece, best quality, 1girl, (film grain:1.2), <lora:film:0.8>, <lora:grain:0.5>\n"
        "detailed background, cinematic lighting"
    )
    assert p["Negative prompt"] == "bad-hands, (worst quality:1.4), lowres\nblurry, jpeg artifacts"
    expected = {
        "Steps": "28", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "6.5",
        "Seed": "3141592653", "Size": "512x768", "Size-1": "512", "Size-2": "768",
        "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly", "VAE hash": "735e4c3a44",
        "VAE": "vae-ft-mse-840000-ema-pruned.safetensors", "Variation seed": "5",
        "Variation seed strength": "0.3", "Denoising strength": "0.45", "Clip skip": "2",
        "Hires upscale": "2", "Hires steps": "10", "Hires upscaler": "Latent",
        "Lora hashes": "film: 0123456789ab, grain: ba9876543210", "TI hashes": "bad-hands: 0123456789ab",
        "Emphasis": "Original", "RNG": "CPU", "Version": "v1.10.1",
    }
    assert {k: v for k, v in p.items() if k not in ("Prompt", "Negative prompt")} == expected
    assert list(p)[2:5] == ["Steps", "Sampler", "Schedule type"]  # written order kept


def test_parses_older_infotext_with_json_values_and_extension_keys() -> None:
    p = parse_infotext(OLDER)
    assert p["Prompt"] == "portrait of an old sailor, dramatic light"
    assert p["Negative prompt"] == "(deformed, distorted:1.3)"
    assert p["Sampler"] == "DPM++ 2M SDE Karras" and "Schedule type" not in p
    assert (p["Hires resize"], p["Hires resize-1"], p["Hires resize-2"]) == ("1024x1536", "1024", "1536")
    assert p["Hires upscaler"] == "R-ESRGAN 4x+"
    assert p["ADetailer model"] == "face_yolov8n.pt" and p["ADetailer mask blur"] == "4"
    assert p["ADetailer prompt"] == "close-up face, detailed eyes"
    assert p["ControlNet 0"].startswith("Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1,")
    assert p["ControlNet 0"].endswith("Control Mode: Balanced")
    assert p["Wildcard prompt"] == 'a "quoted" word,\nsecond line'
    assert p["Version"] == "v1.6.0"


def test_prompt_lines_that_look_like_parameters_stay_in_the_prompt() -> None:
    text = (
        "a poster that reads\n"
        "Steps: 20, Sampler: Euler, CFG scale: 7\n"
        "in big letters\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512"
    )
    p = parse_infotext(text)
    assert p["Prompt"] == "a poster that reads\nSteps: 20, Sampler: Euler, CFG scale: 7\nin big letters"
    assert p["Negative prompt"] == "" and p["Sampler"] == "Euler a" and p["Seed"] == "1"


@pytest.mark.parametrize(
    "text, prompt, negative",
    [
        ("a cat on a mat", "a cat on a mat", ""),
        ("portrait\nStyle: noir, Mood: dark", "portrait\nStyle: noir, Mood: dark", ""),  # 2 pairs only
        ("a cat\nNegative prompt: a dog\nSteps: 20", "a cat", "a dog\nSteps: 20"),
        ("a cat\nNegative prompt: bad: x, worse: y, worst: z", "a cat", "bad: x, worse: y, worst: z"),
        # weighted prompt words hold `word:1.2` but are not pairs
        ("1girl, (smile:1.2), (blue eyes:1.1), (long hair:0.9)", "1girl, (smile:1.2), (blue eyes:1.1), (long hair:0.9)", ""),
        ("", "", ""),
    ],
)
def test_text_without_a_parameter_line(text: str, prompt: str, negative: str) -> None:
    assert parse_infotext(text) == {"Prompt": prompt, "Negative prompt": negative}


def test_missing_negative_prompt_and_unknown_keys() -> None:
    p = parse_infotext("a cat\nSteps: 20, Sampler: Euler a, My-ext (v2) 1st key: x y z, CFG scale: 7")
    assert p["Negative prompt"] == "" and p["My-ext (v2) 1st key"] == "x y z" and p["CFG scale"] == "7"


def test_windows_line_ends() -> None:
    p = parse_infotext(FULL.replace("\n", "\r\n") + "\r\n")
    assert p == parse_infotext(FULL)


def test_values_are_not_touched() -> None:
    p = parse_infotext('x\nSteps: 020, Seed: -1, CFG scale: 7.50, Note: "not json, \\u00e9", Odd: "unterminated')
    assert (p["Steps"], p["Seed"], p["CFG scale"]) == ("020", "-1", "7.50")
    assert p["Note"] == "not json, \u00e9" and p["Odd"] == '"unterminated'


# --- round trips ----------------------------------------------------------------------------------

ENGINE_FIELDS = {
    "Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7.5", "Seed": 4294967295,
    "Size": "512x768", "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly", "VAE hash": "735e4c3a44",
    "VAE": "vae-ft-mse-840000", "Variation seed": 5, "Variation seed strength": 0.3, "Denoising strength": 0.7,
    "Clip skip": 2, "Hires upscale": 2, "Hires steps": 10, "Hires upscaler": "Latent (nearest-exact)",
    "Lora hashes": "film: 0123456789ab, grain: ba9876543210", "TI hashes": "bad-hands: 0123456789ab",
    "Version": "v1.10.1",
}

TRICKY_VALUES = {
    "Comma": "a, b", "Colon": "x: y", "Quoted": '"quoted"', "Inner quote": 'say "hi"', "Ends quote": 'end"',
    "Starts quote": '"start', "Newline": "line 1\nline 2", "Carriage": "a\rb", "Padded": "  padded  ",
    "Backslash": "C:\\models\\x.safetensors", "Non-ASCII": "日本語, ok 🎨", "JSON": '{"a": [1, 2]}',
    "Empty": "", "Brackets": "[d14c016b]", "Size-like": "64x64",
}


@pytest.mark.parametrize(
    "prompt, negative",
    [
        ("a red cube", ""),
        ("line one, (word:1.2)\nline two: 日本語 🎨\n\nafter a blank line", "bad\nworse, Steps: 3"),
        ("", "only a negative"),
        ("Steps: 20, Sampler: Euler, CFG scale: 7", ""),  # a prompt that looks like parameters
    ],
)
def test_round_trip_engine_fields_and_unknown_keys(prompt: str, negative: str) -> None:
    params = {**ENGINE_FIELDS, **TRICKY_VALUES}
    text = format_infotext(prompt, negative, params)
    assert text.endswith("Version: v1.10.1")
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == prompt and parsed["Negative prompt"] == negative
    for key, value in params.items():
        assert parsed[key] == str(value), key
    assert (parsed["Size-1"], parsed["Size-2"]) == ("512", "768")


def test_format_writes_the_a1111_layout() -> None:
    text = format_infotext("p", "n", {"Version": "v1", "Foo": "a, b", "Steps": 20, "Seed": 1, "Clip skip": None, "Sampler": "Euler"})
    assert text == 'p\nNegative prompt: n\nSteps: 20, Sampler: Euler, Seed: 1, Foo: "a, b", Version: v1'
    assert format_infotext("p", "", {"Steps": 1, "Seed": 2, "Size": "8x8"}) == "p\nSteps: 1, Seed: 2, Size: 8x8"


# --- to request fields ----------------------------------------------------------------------------


def test_fields_from_a_full_infotext() -> None:
    fields = infotext_to_fields(parse_infotext(FULL))
    assert fields == {
        "prompt": parse_infotext(FULL)["Prompt"],
        "negative_prompt": "bad-hands, (worst quality:1.4), lowres\nblurry, jpeg artifacts",
        "steps": 28, "sampler_name": "DPM++ 2M", "scheduler": "Karras", "cfg_scale": 6.5, "seed": 3141592653,
        "width": 512, "height": 768, "clip_skip": 2, "checkpoint": "6ce0161689", "denoising_strength": 0.45,
        "subseed": 5, "subseed_strength": 0.3,
        "enable_hr": True, "hr_scale": 2.0, "hr_second_pass_steps": 10, "hr_upscaler": "Latent",
    }
    assert isinstance(fields["steps"], int) and isinstance(fields["cfg_scale"], float)


def test_fields_from_an_older_infotext() -> None:
    fields = infotext_to_fields(parse_infotext(OLDER))
    assert (fields["sampler_name"], fields["scheduler"]) == ("DPM++ 2M SDE", "Karras")
    assert fields["clip_skip"] == 1  # left out when 1
    assert (fields["hr_resize_x"], fields["hr_resize_y"]) == (1024, 1536)
    assert fields["enable_hr"] is True and "hr_scale" not in fields and fields["hr_upscaler"] == "R-ESRGAN 4x+"
    assert fields["checkpoint"] == "a1b2c3d4e5"


@pytest.mark.parametrize(
    "sampler, schedule, expected",
    [
        ("DPM++ 2M Karras", None, ("DPM++ 2M", "Karras")),
        ("DPM++ 2M SDE Exponential", None, ("DPM++ 2M SDE", "Exponential")),
        ("DPM++ 2M SGMUniform", None, ("DPM++ 2M", "SGM Uniform")),
        ("Brand New Sampler karras", None, ("Brand New Sampler", "Karras")),  # not in our table
        ("Euler a", None, ("Euler a", "Automatic")),
        ("DDIM", None, ("DDIM", "Automatic")),
        ("Karras", None, ("Karras", "Automatic")),  # nothing left to be a sampler
        ("DPM++ 2M Karras", "Exponential", ("DPM++ 2M", "Exponential")),  # Schedule type wins
        ("Euler", "Align Your Steps", ("Euler", "Align Your Steps")),
    ],
)
def test_sampler_and_schedule(sampler: str, schedule: str | None, expected: tuple[str, str]) -> None:
    params = {"Prompt": "x", "Negative prompt": "", "Steps": "20", "Sampler": sampler, "Seed": "1"}
    if schedule:
        params["Schedule type"] = schedule
    fields = infotext_to_fields(params)
    assert (fields["sampler_name"], fields["scheduler"]) == expected


def test_split_sampler_name() -> None:
    assert split_sampler_name(" LMS Karras ") == ("LMS", "Karras")
    assert split_sampler_name("UniPC") == ("UniPC", None)


def test_only_present_fields_and_bad_numbers_are_skipped() -> None:
    assert infotext_to_fields(parse_infotext("just a prompt")) == {"prompt": "just a prompt", "negative_prompt": ""}
    params = {
        "Steps": "twenty", "CFG scale": "high", "Seed": "", "Size": "big", "Clip skip": "x", "Hires steps": "?",
        "Denoising strength": "nan", "Variation seed": "1.5", "Model": "sd1 [abc]", "Sampler": "Euler",
    }
    fields = infotext_to_fields(params)
    assert fields == {"sampler_name": "Euler", "scheduler": "Automatic", "checkpoint": "sd1 [abc]", "enable_hr": True}


def test_numbers_written_as_floats_and_size_parts() -> None:
    fields = infotext_to_fields({"Steps": "20.0", "Seed": "7", "Size-1": "640", "Size-2": "448", "CFG scale": "7"})
    assert fields == {"steps": 20, "seed": 7, "width": 640, "height": 448, "cfg_scale": 7.0, "clip_skip": 1}


def test_pre_1_0_hires_fix() -> None:
    fields = infotext_to_fields(parse_infotext("x\nSteps: 20, Size: 1024x1024, First pass size: 512x512, Denoising strength: 0.6"))
    assert fields["enable_hr"] is True
    assert (fields["width"], fields["height"], fields["hr_resize_x"], fields["hr_resize_y"]) == (512, 512, 1024, 1024)


def test_fields_build_a_generation_request() -> None:
    text = format_infotext("a red cube\non a table", "blurry", {
        "Steps": 12, "Sampler": "Euler a", "Schedule type": "Automatic", "CFG scale": "6.5", "Seed": 99,
        "Size": "640x448", "Model hash": "6ce0161689", "Model": "sd1", "Clip skip": 2, "Version": "v0.1.0",
    })
    fields = infotext_to_fields(parse_infotext(text))
    req = GenerationRequest(**{k: v for k, v in fields.items() if k in GenerationRequest.model_fields})
    assert (req.prompt, req.negative_prompt, req.steps, req.cfg_scale, req.seed) == ("a red cube\non a table", "blurry", 12, 6.5, 99)
    assert (req.width, req.height, req.clip_skip, req.checkpoint, req.sampler_name) == (640, 448, 2, "6ce0161689", "Euler a")


def test_refiner_sampler_options_and_tiling() -> None:
    text = ("a cat\nSteps: 20, Sampler: Euler a, Seed: 1, Size: 64x64, Tiling: True, Eta: 0.5, Sigma churn: 0.2, "
            "Sigma noise: 0.9, Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.7")
    fields = infotext_to_fields(parse_infotext(text))
    assert fields["refiner_checkpoint"] == "7440042bbd"
    assert fields["refiner_switch_at"] == 0.7
    assert (fields["eta"], fields["s_churn"], fields["s_noise"], fields["tiling"]) == (0.5, 0.2, 0.9, True)
    named = infotext_to_fields(parse_infotext("x\nSteps: 2, Sampler: Euler, Refiner: my-refiner"))
    assert named["refiner_checkpoint"] == "my-refiner"
