"""Deployment: a real coordinator and real devices, on Flower's SuperLink and SuperNodes.

``pollinate server start`` runs the coordinator, ``pollinate node start`` a device, both in
the foreground and supervising their Flower processes (:mod:`.proc`). Like
:mod:`pollinate.simulation`, this package *composes* the ServerApp (``server/``) and the
ClientApp (``client/``) unchanged; only :mod:`pollinate.cli` imports it.

Modules: :mod:`.certs` (TLS certificates, node keys), :mod:`.server`, :mod:`.node`,
:mod:`.link` (the ``flwr`` CLI against our SuperLink), :mod:`.appdir` (the Flower app
bundled for a run), :mod:`.superlink` / :mod:`.supernode` (Flower's own entry points with
Pollinate's hardening and timings), :mod:`.worker` (the warm ClientApp process),
:mod:`.state` (state folders), :mod:`.cli` (the argparse commands).
"""
