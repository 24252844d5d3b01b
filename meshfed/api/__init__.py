"""The node's REST API, its Prometheus metrics and the operator's client.

``serve_api`` (in :mod:`.service`) runs a FastAPI app on hypercorn's trio worker inside the
node's nursery (no second loop, no thread); :mod:`.app` holds the routes, :mod:`.models` the
request and response bodies, :mod:`.token` the bearer token, :mod:`.limits` the cap on request
bodies, :mod:`.metrics` the ``/metrics`` collector (``alerts.yml``: Prometheus alert rules),
:mod:`.docs` the offline ``/docs`` page, :mod:`.client` and :mod:`.cli` the operator's
commands. The live dashboard: :mod:`.dashboard` (its routes, ``static/`` its page),
:mod:`.live` (what it shows, kept by a task beside the API), :mod:`.stream` (server-sent
events), :mod:`.alerting` (``alerts.yml``'s rules evaluated in the node); :mod:`.views` holds
what the routes and the stream share.
"""

__all__: list[str] = []
