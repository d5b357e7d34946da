"""The HTTP gateway: Tinker API + the original JSON API in front of the tinker-bus event pipeline."""

from bus_gateway.app import create_app

__all__ = ["create_app"]
