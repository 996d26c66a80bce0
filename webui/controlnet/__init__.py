"""ControlNet: units that steer a generation with an image (edges, a scribble, a blurred tile),
as the A1111 extension's users and clients know them.

- `units`: a unit's fields, with that extension's names and values (no torch: the page and the
  request import it);
- `preprocess`: the preprocessors (canny, threshold, invert, blur, tile, shuffle; depth through
  `annotators`, from weights the user put in `models/ControlNet/annotators/`);
- `models`: the models in `models/ControlNet/`, original (lllyasviel) or diffusers layout, built
  on the loaded checkpoint's UNet configuration and checked against it;
- `apply`: the per-call model inputs (the denoiser's `model_inputs` seam) that add each unit's
  residuals, with its weight, step range and control mode.
"""

# `units` and the request import each other (a request holds units; a unit holds request images):
# loading the request first, whichever is asked for, keeps the cycle resolvable.
import webui.pipeline.request  # noqa: F401
