"""Developer tools that are not the gateway: the mock model and ``sluice demo``.

Nothing on the request path imports this package; ``proxy.cli`` imports it
only inside the ``mock-upstream`` and ``demo`` commands, so ``sluice serve``
never loads the mock.
"""
