"""The OpenAI-compatible inference API (/v1/...): chat and text completions, streamed or not, and the model list,
on the same sampler topic as Tinker sampling; errors in OpenAI's shape."""

from litestar import Router

from bus_gateway.openai_api import routes
from bus_gateway.openai_api.errors import EXCEPTION_HANDLERS


def router(max_body_bytes: int) -> Router:
    """The /v1 routes; prompts are data, so they get the data routes' body limit (GatewayConfig.max_body_bytes)."""
    return Router("/", route_handlers=routes.ROUTES, exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
                  request_max_body_size=max_body_bytes)
