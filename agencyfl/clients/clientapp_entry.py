"""Flower's ``flwr-clientapp``, started without importing the SuperNode's command line.

A SuperNode's SuperExec starts one ``flwr-clientapp`` process per Flower message. Flower's console
script imports ``flwr.supernode.cli``, whose ``__init__`` imports the whole ``flower-supernode`` command
(its SQL object store among it): about 0.6 s of CPU per message, before the ClientApp does anything.
This entry runs the same function, ``flwr_clientapp()`` from Flower's own
``flwr/supernode/cli/flwr_clientapp.py`` (loaded from that file, unchanged), without that package
``__init__``. ``daemons.flower_env`` puts a ``flwr-clientapp`` that calls it first on the daemons' PATH.
``tests/test_daemons.py`` fails if Flower's file stops defining the function.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import flwr.supernode

FLOWER_FILE = Path(flwr.supernode.__file__).parent / "cli" / "flwr_clientapp.py"


def flower_module() -> ModuleType:
    """Flower's ``flwr_clientapp`` module, executed from its file under a private name."""
    spec = importlib.util.spec_from_file_location("agencyfl._flwr_clientapp", FLOWER_FILE)
    if spec is None or spec.loader is None:  # pragma: no cover - Flower's layout changed
        raise ImportError(f"cannot load {FLOWER_FILE}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    """``flwr-clientapp`` with Flower's arguments (``sys.argv``)."""
    flower_module().flwr_clientapp()


if __name__ == "__main__":
    main()
