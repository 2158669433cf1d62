"""A mypy plugin that checks ``Model.create(...)``'s keywords against the model's fields.

``create(**values)`` takes any keyword at run time (and raises ``FieldValueError`` for one
that is not a field). With the plugin, mypy flags an unknown name, a dict or list field
(which take their entries after the create) and a value of the wrong type for a typed
``DField``. Enable it in the mypy configuration::

    [mypy]
    plugins = dmodel.mypy_plugin

pyright has no plugins: there, ``create``'s keywords are checked at run time only.
"""

from __future__ import annotations

from collections.abc import Callable

from mypy.errorcodes import ARG_TYPE, CALL_ARG
from mypy.messages import format_type
from mypy.nodes import TypeInfo, Var
from mypy.plugin import MethodContext, Plugin
from mypy.subtypes import is_subtype
from mypy.types import CallableType, Instance, Type, TypeType, get_proper_type

_MODEL = "dmodel.model.DModel"
_FIELD, _DICT, _LIST = "dmodel.model.DField", "dmodel.model.DDict", "dmodel.model.DList"


class DModelPlugin(Plugin):
    """Hooks ``create`` called on a model class."""

    def get_method_hook(self, fullname: str) -> Callable[[MethodContext], Type] | None:
        # The name is the receiving class's (``user.Person.create``): the hook checks
        # that the class is a model.
        return _check_create if fullname.endswith(".create") else None


def _model(receiver: Type) -> TypeInfo | None:
    """The model class ``create`` is called on (``Person.create`` or ``cls.create``)."""
    proper = get_proper_type(receiver)
    if isinstance(proper, CallableType) and proper.is_type_obj():
        return proper.type_object()
    if isinstance(proper, TypeType) and isinstance(proper.item, Instance):
        return proper.item.type
    return None


def _fields(model: TypeInfo) -> dict[str, Instance]:
    """The model's field declarations by attribute, the nearest class's first."""
    out: dict[str, Instance] = {}
    for cls in model.mro:
        for name, symbol in cls.names.items():
            declared = get_proper_type(symbol.node.type) if isinstance(symbol.node, Var) \
                and symbol.node.type is not None else None
            if isinstance(declared, Instance) and declared.type.fullname in (_FIELD, _DICT,
                                                                              _LIST):
                out.setdefault(name, declared)
    return out


def _check_create(ctx: MethodContext) -> Type:
    model = _model(ctx.type)
    if model is None or not model.has_base(_MODEL) or "values" not in ctx.callee_arg_names:
        return ctx.default_return_type
    fields = _fields(model)
    at = ctx.callee_arg_names.index("values")
    for name, actual, expr in zip(ctx.arg_names[at], ctx.arg_types[at], ctx.args[at],
                                  strict=True):
        if name is None:
            continue  # ``**values`` passed on: its keys are not known here
        field = fields.get(name)
        if field is None:
            ctx.api.fail(f'"{model.name}" has no field "{name}"', expr, code=CALL_ARG)
        elif field.type.fullname != _FIELD:
            kind = "dict" if field.type.fullname == _DICT else "list"
            ctx.api.fail(f'"{name}" is a {kind} field: set its entries after create', expr,
                         code=CALL_ARG)
        elif field.args and not is_subtype(actual, field.args[0]):
            ctx.api.fail(f'Field "{name}" of "{model.name}" takes '
                         f"{format_type(field.args[0], ctx.api.options)}, not "
                         f"{format_type(actual, ctx.api.options)}", expr, code=ARG_TYPE)
    return ctx.default_return_type


def plugin(version: str) -> type[Plugin]:
    """mypy's entry point."""
    return DModelPlugin
