"""The methods a benchmark run compares, found rather than listed.

Spec-Bench (Xia et al. 2024) measures every method against plain decoding on the same prompts and
hardware. A *method* here is a named factory ``(target, draft, generation) -> Method | None``:
``generation`` holds the run's ``generate()`` keyword arguments (``max_new_tokens``, ``do_sample``,
``temperature``); ``None`` (or raising ``NotApplicable`` with a reason) means the method does not
apply, e.g. a draft-model method when there is no draft. ``available_methods`` gathers them from:

1. ``REGISTRY``, filled with ``@register(name)`` (snake_case names): the baseline ``plain``,
   transformers' own assisted generation and prompt lookup, and hf_spec configurations worth
   comparing beyond defaults (multi-candidate prompt lookup, adaptive draft length, the trained Medusa
   heads committed with the repository). A drafter that needs more than defaults registers a factory here.
2. Drafters: every concrete ``hf_spec.Drafter`` subclass that ``hf_spec`` exports, built from its
   defaults, under its class name (``PromptLookupDrafter``). A required ``draft_model`` (or ``draft``)
   parameter gets the run's draft and a required ``target`` the target; any other required parameter
   makes the class unbuildable, and it is reported as skipped. A new drafter joins the benchmark once exported.
3. Tree shapes: a drafter whose own ``begin`` takes ``tree_spec`` also runs with every other shape of the
   engine's ``TREE_SHAPES`` (``chain``, ``static``, ``dynamic``...), as ``<Class>(tree='<shape>')``.
4. Verification rules: every rule of the engine's ``RULES`` registry that fits the run's decoding
   mode and is not its default, crossed with the branching methods (trees and multi-candidate
   presets: rules differ only where a node has several children), as ``<method>+verification=<rule>``
   or ``<Class>(tree=..., verification='<rule>')``.

Any other configuration can be named as a spec, ``<Class>(arg=value, ...)`` or, for drafters with
trained weights, ``<Class>.from_pretrained(path_or_id='...', ...)``: Python call syntax with literal
values, never evaluated. Arguments the constructor (or classmethod) takes build the drafter (the
target and draft are filled in), the others (``verification=...``, ``tree_budget=...``) go to
``generate()``. ``hf-spec bench --list-methods`` prints what a run would measure. (The ``hf_spec:``
prefix names models, see ``hf_spec.models``, never methods.)
"""

from __future__ import annotations

import ast
import copy
import fnmatch
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import GenerationConfig

import hf_spec
from hf_spec.drafters.base import Drafter
from hf_spec.errors import UnsupportedError
from hf_spec.models import MODEL_PREFIX

BASELINE = "plain"
# Trained heads committed with the repository (see the README): found in a checkout, not in an installed wheel.
TRAINED_MEDUSA_HEADS = Path(__file__).resolve().parents[2] / "artifacts" / "medusa-smollm2-135m-instruct"
TRAINED_EAGLE3_DRAFT = Path(__file__).resolve().parents[2] / "artifacts" / "eagle3-smollm2-135m-instruct"
DRAFT_PARAMETERS = ("draft_model", "draft")
TARGET_PARAMETERS = ("target", "target_model")


@dataclass
class Method:
    """A way to generate: ``generate(input_ids, **overrides)`` returns the full sequence, like ``model.generate``.

    ``drafter`` is set for hf_spec methods, whose per-call statistics it holds; ``lossless=False``
    marks methods that are not expected to match plain decoding.
    """

    name: str
    kind: str  # "baseline", "transformers" or "hf_spec"
    generate: Callable[..., torch.Tensor]
    drafter: Drafter | None = None
    lossless: bool = True
    description: str = ""
    model: object | None = None  # the model it decodes with when that is not the bench's target (forwards counted)


Factory = Callable[[object, object, dict], "Method | None"]
REGISTRY: dict[str, Factory] = {}


class NotApplicable(Exception):
    """Raised by a factory whose method cannot run in this setting; the message says why."""


def register(name: str, branching: bool = False) -> Callable[[Factory], Factory]:
    """Add a factory under ``name``; ``branching`` ones (trees) are also run with each extra verification rule."""

    def add(factory: Factory) -> Factory:
        factory.branching = branching
        REGISTRY[name] = factory
        return factory

    return add


# --------------------------------------------------------------------------------------------- registered


DEFAULT_KERNELS = "plain_default_kernels"


@register(BASELINE)
def plain(target, draft, generation: dict) -> Method:
    return Method(BASELINE, "baseline", _generate(target, generation), description="plain generate()")


def plain_default_kernels(unaccelerated_target, generation: dict) -> Method:
    """Plain decoding on a copy of the target taken before ``hf_spec.accelerate_for_cpu`` (the bench's
    ``default_kernels_baseline``): the fast path's end-to-end gain, measured in the same run."""
    return Method(DEFAULT_KERNELS, "baseline", _generate(unaccelerated_target, generation),
                  description="plain generate() with torch's default kernels", model=unaccelerated_target)


@register("transformers_assisted")
def transformers_assisted(target, draft, generation: dict) -> Method:
    if draft is None:
        raise NotApplicable("needs a draft model")
    config = copy.deepcopy(draft.generation_config)
    run = _generate(target, generation, assistant_model=draft)

    def generate(input_ids, **overrides):
        # transformers carries a "heuristic" draft length over to the next call in the draft's config: undo that,
        # so that every measured call starts alike.
        try:
            return run(input_ids, **overrides)
        finally:
            draft.generation_config = copy.deepcopy(config)

    return Method("transformers_assisted", "transformers", generate,
                  description="generate(assistant_model=draft), transformers' default draft length schedule")


@register("transformers_prompt_lookup")
def transformers_prompt_lookup(target, draft, generation: dict) -> Method:
    same_as_hf_spec = hf_spec.PromptLookupDrafter()  # compare like with like: hf_spec's default lengths
    kwargs = dict(prompt_lookup_num_tokens=same_as_hf_spec.num_tokens,
                  max_matching_ngram_size=same_as_hf_spec.max_ngram)
    return Method("transformers_prompt_lookup", "transformers", _generate(target, generation, **kwargs),
                  description=f"generate({', '.join(f'{k}={v}' for k, v in kwargs.items())})")


@register("hf_spec_prompt_lookup_tree", branching=True)
def prompt_lookup_tree(target, draft, generation: dict) -> Method:
    return hf_spec_method("hf_spec_prompt_lookup_tree", target, hf_spec.PromptLookupDrafter(max_candidates=4),
                          generation)


@register("hf_spec_draft_adaptive")
def draft_adaptive(target, draft, generation: dict) -> Method:
    if draft is None:
        raise NotApplicable("needs a draft model")
    drafter = hf_spec.DraftModelDrafter(draft, num_tokens=4, schedule="heuristic", confidence_threshold=0.4)
    return hf_spec_method("hf_spec_draft_adaptive", target, drafter, generation)


@register("hf_spec_medusa_trained")
def medusa_trained(target, draft, generation: dict) -> Method:
    """The Medusa heads trained on this project's CPU for SmolLM2-135M-Instruct, with their default tree."""
    if not (TRAINED_MEDUSA_HEADS / "config.json").is_file():
        raise NotApplicable(f"the committed heads are in a checkout of the repository ({TRAINED_MEDUSA_HEADS} "
                            "is missing); name other heads as MedusaDrafter.from_pretrained(path_or_id='...')")
    drafter = hf_spec.MedusaDrafter.from_pretrained(TRAINED_MEDUSA_HEADS, target=target)
    return hf_spec_method("hf_spec_medusa_trained", target, drafter, generation)


@register("hf_spec_eagle3_trained")
def eagle3_trained(target, draft, generation: dict) -> Method:
    """The EAGLE-3 draft layer trained on this project's CPU for SmolLM2-135M-Instruct, with its dynamic tree."""
    if not (TRAINED_EAGLE3_DRAFT / "config.json").is_file():
        raise NotApplicable(f"the committed draft is in a checkout of the repository ({TRAINED_EAGLE3_DRAFT} is "
                            "missing); name another as Eagle3Drafter.from_pretrained(path_or_id='...')")
    drafter = hf_spec.Eagle3Drafter.from_pretrained(TRAINED_EAGLE3_DRAFT, target=target)
    return hf_spec_method("hf_spec_eagle3_trained", target, drafter, generation)


# --------------------------------------------------------------------------------------------- building blocks


def hf_spec_method(name: str, target, drafter: Drafter, generation: dict, lossless: bool = True,
                   **generate_kwargs) -> Method:
    """An hf_spec method: ``target.generate(assistant_model=drafter, ...)`` (a drafter that wraps the target decodes
    with its own copy, ``drafter.model``)."""
    extra = "".join(f", {key}={value!r}" for key, value in generate_kwargs.items())
    own = drafter.model if drafter.wraps_target else None
    return Method(name, "hf_spec", _generate(own or target, generation, assistant_model=drafter, **generate_kwargs),
                  drafter, lossless, description=f"{drafter!r}{extra}", model=own)


def shared_weights_copy(model):
    """A copy of ``model``'s module tree that shares every parameter and buffer with it (no weight is copied; packed
    oneDNN weights could not be). A drafter that wraps its target's layers in place (``wraps_target``, gated-LoRA
    MTP) gets one, so the other methods keep running the target as it was loaded."""
    shared = {id(tensor): tensor for tensor in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, shared)


def _generate(target, generation: dict, **fixed) -> Callable[..., torch.Tensor]:
    def generate(input_ids, **overrides):
        return target.generate(input_ids, **{**generation, **fixed, **overrides})

    return generate


def exported_drafters() -> list[type[Drafter]]:
    """Concrete ``Drafter`` subclasses among ``hf_spec``'s public names, in ``__all__`` order first."""
    names = [*getattr(hf_spec, "__all__", []), *sorted(vars(hf_spec))]
    found = []
    for name in dict.fromkeys(names):
        value = getattr(hf_spec, name, None)
        if (not name.startswith("_") and inspect.isclass(value) and issubclass(value, Drafter)
                and not inspect.isabstract(value) and value not in found):
            found.append(value)
    return found


def needs_more_than_defaults(cls: type[Drafter]) -> bool:
    """True if building ``cls`` needs a required argument other than the target or the draft."""
    return any(parameter.default is parameter.empty and name not in DRAFT_PARAMETERS + TARGET_PARAMETERS
               and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
               for name, parameter in inspect.signature(cls).parameters.items())


def tree_shapes(cls: type[Drafter]) -> list[str]:
    """The engine's tree shapes ``cls`` can draft other than its default one (none if it takes no ``tree``)."""
    from hf_spec.engine import dynamic_tree

    if not _takes_tree(cls):
        return []
    default = inspect.signature(cls).parameters.get("tree")
    return [shape for shape in getattr(dynamic_tree, "TREE_SHAPES", ())
            if default is None or shape != default.default]


def _takes_tree(cls: type[Drafter]) -> bool:
    """Whether a ``begin`` of ``cls`` below the base class (which refuses trees) takes ``tree_spec``."""
    for klass in cls.__mro__:
        if klass is Drafter:
            return False
        begin = vars(klass).get("begin")
        if begin is not None and "tree_spec" in inspect.signature(begin).parameters:
            return True
    return False


def spec_name(cls: type[Drafter], **arguments) -> str:
    """``Class(a=1, b='x')``, the spec that builds ``cls`` with ``arguments``."""
    return f"{cls.__name__}({', '.join(f'{key}={value!r}' for key, value in arguments.items())})"


def build_drafter(cls: type[Drafter], target, draft, constructor: str | None = None, **kwargs) -> Drafter:
    """``cls(**kwargs)`` (or ``cls.<constructor>(**kwargs)``) with its required target/draft parameters filled in.

    Raises ``NotApplicable`` if another required parameter is missing, or the draft is.
    """
    build = getattr(cls, constructor) if constructor else cls
    for name, parameter in inspect.signature(build).parameters.items():
        if name in kwargs or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.default is not parameter.empty:
            continue
        if name in DRAFT_PARAMETERS:
            if draft is None:
                raise NotApplicable("needs a draft model")
            kwargs[name] = draft
        elif name in TARGET_PARAMETERS:
            kwargs[name] = shared_weights_copy(target) if cls.wraps_target else target
        else:
            raise NotApplicable(f"{cls.__name__} needs {name}=...: name it as a spec such as "
                                f"{cls.__name__}.from_pretrained(path_or_id='...'), or register a factory")
    return build(**kwargs)


def discovered_factory(cls: type[Drafter]) -> Factory:
    def factory(target, draft, generation: dict) -> Method:
        return hf_spec_method(cls.__name__, target, build_drafter(cls, target, draft), generation)

    return factory


def spec_factory(spec: str) -> Factory:
    """A factory for ``<Class>[.<classmethod>](arg=value, ...)``.

    Arguments the constructor (or the classmethod, e.g. ``from_pretrained``) takes build the drafter;
    the others go to ``generate()``.
    """
    class_name, constructor, arguments = parse_spec(spec)
    classes = {cls.__name__: cls for cls in exported_drafters()}
    if class_name not in classes:
        raise ValueError(f"Unknown drafter {class_name!r} in method {spec!r}; hf_spec exports {sorted(classes)}.")
    cls = classes[class_name]
    if constructor and not inspect.ismethod(getattr(cls, constructor, None)):
        raise ValueError(f"{class_name}.{constructor} in method {spec!r} is not a classmethod of {class_name}.")
    accepted = inspect.signature(getattr(cls, constructor) if constructor else cls).parameters
    build_kwargs = {key: value for key, value in arguments.items() if key in accepted}
    generate_kwargs = {key: value for key, value in arguments.items() if key not in accepted}

    def factory(target, draft, generation: dict) -> Method:
        drafter = build_drafter(cls, target, draft, constructor, **build_kwargs)
        return hf_spec_method(spec, target, drafter, generation, lossless=_is_lossless(generate_kwargs),
                              **generate_kwargs)

    return factory


def parse_spec(spec: str) -> tuple[str, str | None, dict]:
    """``"Name.method(a=1, b='x')"`` -> ``("Name", "method", {"a": 1, "b": "x"})``; literal values only.

    Nothing is evaluated: the text is parsed, and only a class name, an optional classmethod name and
    keyword arguments with literal values are accepted.
    """
    if spec.startswith(MODEL_PREFIX):
        raise ValueError(f"Method {spec!r}: the hf_spec: prefix names models, not methods; write the spec "
                         f"without it: {spec[len(MODEL_PREFIX):]!r}.")
    try:
        node = ast.parse(spec.strip(), mode="eval").body
        arguments = {}
        if isinstance(node, ast.Call) and not node.args and all(keyword.arg for keyword in node.keywords):
            arguments = {keyword.arg: ast.literal_eval(keyword.value) for keyword in node.keywords}
            node = node.func
        if isinstance(node, ast.Name):
            return node.id, None, arguments
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            return node.value.id, node.attr, arguments
    except (SyntaxError, ValueError):
        pass
    raise ValueError(f"Cannot read method spec {spec!r}; write it as Class(name=value, ...) or "
                     "Class.from_pretrained(name=value, ...) with literal values.")


# --------------------------------------------------------------------------------------------- verification rules


def verification_rules() -> dict:
    """The engine's rule registry (name -> rule; aliases share a rule), as the decoding loop sees it."""
    from hf_spec.engine import loop

    return dict(getattr(loop, "RULES", {}))


def extra_verification_rules(do_sample: bool) -> list[str]:
    """Names of the verification rules for this decoding mode other than the default one (aliases once)."""
    from hf_spec.engine import loop

    try:
        default = loop._choose_verification("auto", GenerationConfig(do_sample=do_sample))
    except Exception:  # an engine without a rule registry: no variants to add
        return []
    names, seen = [], [default]
    for name, rule in verification_rules().items():
        if getattr(rule, "sampling", do_sample) == do_sample and not any(rule is other for other in seen):
            seen.append(rule)
            names.append(name)
    return names


def _is_lossless(generate_kwargs: dict) -> bool:
    rule = verification_rules().get(generate_kwargs.get("verification"))
    return getattr(rule, "lossless", True)


def verification_variant(base: Factory, rule: str) -> Factory:
    def factory(target, draft, generation: dict) -> Method | None:
        method = base(target, draft, generation)
        if method is None or method.drafter is None:
            return None
        return hf_spec_method(f"{method.name}+verification={rule}", target, method.drafter, generation,
                              lossless=_is_lossless({"verification": rule}), verification=rule)

    return factory


# --------------------------------------------------------------------------------------------- selection


def available_methods(do_sample: bool) -> dict[str, Factory]:
    """Every method name this run could measure, baseline first, with its factory."""
    factories = dict(REGISTRY)
    branching_presets = [name for name, factory in REGISTRY.items() if getattr(factory, "branching", False)]
    trees: list[tuple[type[Drafter], str]] = []
    for cls in exported_drafters():
        factories.setdefault(cls.__name__, discovered_factory(cls))
        if not needs_more_than_defaults(cls):
            for shape in tree_shapes(cls):
                factories[spec_name(cls, tree=shape)] = spec_factory(spec_name(cls, tree=shape))
                if shape != "chain":
                    trees.append((cls, shape))
    for rule in extra_verification_rules(do_sample):
        for name in branching_presets:
            factories[f"{name}+verification={rule}"] = verification_variant(REGISTRY[name], rule)
        for cls, shape in trees:
            factories[spec_name(cls, tree=shape, verification=rule)] = spec_factory(
                spec_name(cls, tree=shape, verification=rule))
    return {BASELINE: factories.pop(BASELINE), **factories}


def build_methods(target, draft, generation: dict, selection: list[str] | None = None
                  ) -> tuple[list[Method], dict[str, str]]:
    """The methods to measure (baseline first) and, for those left out, why.

    ``selection`` holds method names, glob patterns over them (``*Drafter*``) or ``Class(...)`` specs;
    ``None`` means every available method. The baseline is always included. A factory that finds its
    method unsupported here (``NotApplicable``, or ``UnsupportedError`` such as heads trained for another
    target) leaves it out, with the reason.
    """
    factories = available_methods(bool(generation.get("do_sample")))
    chosen = _resolve(selection, factories)
    methods, skipped = [], {}
    for name, factory in chosen.items():
        try:
            method = factory(target, draft, generation)
        except (NotApplicable, UnsupportedError) as reason:
            skipped[name] = str(reason)
            continue
        if method is None:
            skipped[name] = "not applicable"
        else:
            methods.append(method)
    return methods, skipped


def _resolve(selection: list[str] | None, factories: dict[str, Factory]) -> dict[str, Factory]:
    if not selection:
        return factories
    chosen = {BASELINE: factories[BASELINE]}
    for entry in selection:
        matches = [name for name in factories if fnmatch.fnmatchcase(name, entry)]
        if matches:
            chosen.update({name: factories[name] for name in matches})
        elif "(" in entry or entry.startswith(MODEL_PREFIX):
            chosen[entry] = spec_factory(entry)
        else:
            raise ValueError(f"Unknown method {entry!r}; available: {', '.join(factories)} "
                             "(or a spec such as PromptLookupDrafter(max_candidates=4)).")
    return chosen

