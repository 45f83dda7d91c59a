"""The plugin manager: built-in plugins plus whatever the ``specbeam`` entry-point group provides."""

from __future__ import annotations

from typing import Any

import pluggy

from . import builtin, hookspecs


def get_plugin_manager(load_entrypoints: bool = True) -> pluggy.PluginManager:
    """A fresh plugin manager with the hook specs, the built-in plugin and entry-point plugins."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(builtin, name="builtin")
    if load_entrypoints:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    return pm


def make_drafter(pm: pluggy.PluginManager, name: str, **options: Any):
    """Ask the plugins for the drafter called ``name``; a clear error if none provides it."""
    drafter = pm.hook.specbeam_make_drafter(name=name, options=options)
    if drafter is None:
        known = sorted({n for names in pm.hook.specbeam_drafter_names() for n in names})
        raise ValueError(f"unknown drafter {name!r}; available: {', '.join(known)}")
    return drafter
