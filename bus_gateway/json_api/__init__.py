"""The original server's JSON API (its README and integration guide are the contract), on the same bus as the
Tinker API: parse the JSON body, call an operation of bus_gateway.submit, render the documented shape."""

from bus_gateway.json_api import adapters, sampling, training

ROUTES = [*training.ROUTES, *adapters.ROUTES, *sampling.ROUTES]
