"""The A1111 ControlNet extension's routes (`/controlnet/...`), in its response shapes: model and
module lists, version, settings, and `detect` (run a preprocessor on images)."""

from __future__ import annotations

import base64
import io
from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from webui.app import Engine
from webui.controlnet import preprocess
from webui.pipeline.request import ImageInput

VERSION = 2  # what the extension's /controlnet/version answers; clients check it is present


class DetectBody(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    controlnet_module: str = "none"
    controlnet_input_images: list[ImageInput] = Field(default_factory=list, max_length=16)
    controlnet_processor_res: int = Field(512, ge=64, le=2048)
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1


def _png(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def build_controlnet_router(engine: Engine, route_class: type) -> APIRouter:
    router = APIRouter(prefix="/controlnet", route_class=route_class, tags=["controlnet"])

    @router.get("/version")
    def version() -> dict:
        return {"version": VERSION}

    @router.get("/model_list")
    def model_list(update: bool = True) -> dict:
        return {"model_list": ["None", *engine.controlnets.titles()]}

    @router.get("/module_list")
    def module_list(alias_names: bool = False) -> dict:
        names = preprocess.names()
        return {"module_list": names, "module_detail": {
            n: {"model_free": False, "sliders": []} for n in names}}

    @router.get("/settings")
    def settings() -> dict:
        return {"control_net_unit_count": engine.settings.get().control_net_unit_count}

    @router.post("/detect")
    def detect(body: DetectBody) -> dict:
        if not body.controlnet_input_images:
            raise HTTPException(422, "controlnet_input_images: give at least one image")
        try:
            images = engine.preprocess(body.controlnet_module, list(body.controlnet_input_images),
                                       body.controlnet_processor_res, body.controlnet_threshold_a,
                                       body.controlnet_threshold_b)
        except ValueError as err:
            raise HTTPException(422, str(err)) from None
        return {"images": [_png(im) for im in images], "info": "Success"}

    return router
