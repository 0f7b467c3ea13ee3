"""Registry of compression methods: name -> (config class, scoring function).

Each method exposes one config-driven entry point, ``score(model, chunks, config) -> Plan``.
The CLI and the Python API (`compress.api.compress`) both look methods up here, so a new
method plugs into ``python -m compress --method NAME`` by registering itself.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from compress.errors import UserError

if TYPE_CHECKING:
    from compress.plan import Plan

__all__ = ["MethodSpec", "available_methods", "check_shrink", "dense_mlp_linears", "get_method", "options_of",
           "register_method"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    score: Callable[..., Plan]
    description: str
    needs_calibration: bool = True
    # Raises UserError (one line naming the structure) for a model the method cannot compress; run
    # before any data is read or any evaluation starts (`compress.api.check_model`).
    check_model: Callable[[Any], Any] | None = None
    # Keyword options its plans' `materialize_` takes besides `rank_multiple` (score maps: "reset"), so
    # that a caller can refuse one before any model loads.
    materialize_options: tuple[str, ...] = ()

    def option_names(self) -> list[str]:
        """The fields of this method's config, i.e. the keys `make_config` (and --method-opt) accept."""
        return sorted(f.name for f in dataclasses.fields(self.config_cls))

    def make_config(self, shared: Mapping[str, Any] | None = None, **options: Any) -> Any:
        """This method's config from explicit `options`, plus `shared` settings where it has them.

        `options` are strict: a key the config does not declare raises `UserError` naming the valid
        keys, so a misspelt option never silently does nothing. `shared` holds settings that every
        caller passes to every method (batch size, checkpoint directory, ...); each applies only where
        the config has that field, and a `None` value means "the method's default". A key given both
        ways has two meanings, and is refused.
        """
        names = set(self.option_names())
        unknown = sorted(set(options) - names)
        if unknown:
            raise UserError(f"method {self.name!r} has no option {', '.join(map(repr, unknown))}; "
                            f"valid options: {', '.join(sorted(names))}")
        shared = {k: v for k, v in (shared or {}).items() if v is not None}
        both = sorted(set(options) & set(shared))
        if both:
            raise UserError(f"option {', '.join(map(repr, both))} of method {self.name!r} is given twice "
                            "(as a method option and as a shared setting); give it once")
        values = {k: v for k, v in shared.items() if k in names}
        values.update(options)
        return self.config_cls(**values)


def options_of(config: Any, options_cls: type) -> Any:
    """The materialization options inside a method config: its fields that `options_cls` declares.

    Method configs (e.g. `MinifyConfig`) extend their options dataclass with scoring-only fields
    (`progress`, `offload`); the plan keeps only the options.
    """
    names = {f.name for f in dataclasses.fields(options_cls)}
    return options_cls(**{k: v for k, v in dataclasses.asdict(config).items() if k in names})


def check_shrink(alpha: float, name: str = "gram_shrink") -> float:
    """`alpha` as a float in [0, 1], or UserError: the `gram_shrink` option of every whitening method."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise UserError(f"{name} must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def dense_mlp_linears(model: Any, method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(targeted linears, gated MLPs) of `model` for a method that prunes MLP channels (minify, surgeon).

    Raises UserError, one line prefixed by `method`, for what such a method cannot prune: a linear it
    cannot target, mixture-of-experts MLPs (the other methods run there and count what they leave
    dense), or an MLP layout `lowrank.surgery.gated_mlps` rejects.
    """
    from lowrank.surgery import expert_structure, gated_mlps, target_linears

    try:
        linears = target_linears(model)
        experts = expert_structure(model)
    except ValueError as exc:
        raise UserError(f"{method}: {exc}") from exc
    if experts is not None:
        raise UserError(f"{method} cannot prune mixture-of-experts MLPs: {experts}; "
                        "svd, svd-llm, asvd and acip run on such models and count the experts they leave dense")
    try:
        return linears, gated_mlps(linears)
    except ValueError as exc:
        raise UserError(f"{method}: {exc}") from exc


_REGISTRY: dict[str, MethodSpec] = {}
# Modules that register methods on import; imported lazily so `import compress` stays light.
_BUILTIN_MODULES = ("compress.methods.svd", "compress.methods.acip", "compress.methods.minify",
                    "compress.methods.surgeon", "compress.methods.svd_llm", "compress.methods.asvd")


def register_method(name: str, config_cls: type, description: str, *, needs_calibration: bool = True,
                    check_model: Callable[[Any], Any] | None = None, materialize_options: tuple[str, ...] = ()):
    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        _REGISTRY[name] = MethodSpec(name, config_cls, fn, description, needs_calibration, check_model,
                                     materialize_options)
        return fn

    return decorator


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a real missing dependency inside the module: surface it
                raise


def available_methods() -> dict[str, MethodSpec]:
    _load_builtins()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> MethodSpec:
    methods = available_methods()
    if name not in methods:
        raise UserError(f"unknown method {name!r}; available: {', '.join(methods)}")
    return methods[name]
