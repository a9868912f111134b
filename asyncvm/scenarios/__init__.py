"""The bundled scenarios: one module per scenario family, each registering its scenarios with
``@asyncvm.scenario`` when imported.

Nothing here imports them: each module is an entry point of the ``asyncvm.scenarios`` group
(pyproject.toml), and ``asyncvm.explore.scenarios.load_bundled()`` loads every entry point of that
group, these and any other installed package's alike. ``common`` holds the shared set-up.
"""
