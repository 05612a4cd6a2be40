"""The one way the control API answers with JSON."""

from __future__ import annotations

from typing import Any

import falcon
import orjson


def send_json(resp: falcon.Response, doc: Any, status: str = falcon.HTTP_200) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.cache_control = ["no-store"]
    resp.data = orjson.dumps(doc)
