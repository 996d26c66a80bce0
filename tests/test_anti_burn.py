"""The shipped `anti-burn` extension: the `step_end` example (scratch, infotext, replace,
`sigma_next`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_extensions import write_extension
from tests.test_shipped_prompt_extensions import engine_for, infos, pixels, req


def test_off_by_default_changes_nothing(data_dir: Path) -> None:
    clean = engine_for(data_dir, disable_all_extensions=True).runner.generate(req(steps=6))
    default = engine_for(data_dir).runner.generate(req(steps=6))
    assert np.array_equal(pixels(default.images[0]), pixels(clean.images[0]))
    assert "Anti-burn" not in infos(default)[0]


def test_the_image_is_the_mean_of_the_last_estimates(data_dir: Path) -> None:
    """With N = 3 the image is the decoded mean of the last three denoised estimates, as a second
    extension records them, for each image of the batch on its own."""
    from webui.pipeline.latents import decode

    write_extension(data_dir, "recorder", '''
        estimates = []

        @hookimpl
        def step_end(stage):
            estimates.append(stage.denoised.clone())
    ''')
    engine = engine_for(data_dir)
    recorder = engine.extensions.get("recorder").module
    plain = engine.runner.generate(req(steps=6, batch_size=2))
    recorded = list(recorder.estimates)
    assert len(recorded) == 6
    burnt = engine.runner.generate(req(steps=6, batch_size=2, extensions={"anti-burn": {"args": [3]}}))
    assert [i["Anti-burn"] for i in infos(burnt)] == ["3", "3"]
    assert all(torch.equal(a, b) for a, b in zip(recorded, recorder.estimates[6:]))  # the same sampling
    expected = decode(engine.bundle(None), torch.stack(recorded[-3:]).mean(dim=0))
    for got, want, before in zip(burnt.images, expected, plain.images):
        assert np.abs(pixels(got) - pixels(want)).max() <= 1
        assert not np.array_equal(pixels(got), pixels(before))


def test_each_pass_is_averaged_and_a_hires_job_records_it(data_dir: Path) -> None:
    engine = engine_for(data_dir)
    result = engine.runner.generate(req(steps=4, enable_hr=True, hr_scale=1.5, denoising_strength=0.6,
                                        extensions={"anti-burn": {"average_last": 2}}))
    assert result.images[0].size == (96, 96) and infos(result)[0]["Anti-burn"] == "2"


def test_bad_values_are_refused_with_the_field_named(data_dir: Path) -> None:
    with pytest.raises(ValueError, match="anti-burn.*average_last"):
        engine_for(data_dir).runner.generate(req(extensions={"anti-burn": {"average_last": 50}}))
