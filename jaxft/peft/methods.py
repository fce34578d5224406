"""PEFT methods as (which hook parameters the model creates, which parameters train).

A method contributes PeftSpec fields (what `jaxft.models.peft_layers` adds to the model) and
trainable rules (which parameters the optimizer sees). `config.peft.method` names one method or a
'+'-joined combination; a combination sets the union of the spec fields and trains the union of the
trainable sets. The rule list of a run is

    head      trainable  ^head/                    (the task head always trains)
    <method>  trainable  ...                       (one rule per method, see METHODS)
    frozen    frozen     ^backbone/  except the trainable patterns and every PEFT leaf

so every pretrained leaf that no method trains is frozen, and every PEFT leaf is claimed only by
the method that adds it (a model built with another spec fails the coverage check).

| method           | trains (besides the head)                      | spec                          |
| full             | every pretrained backbone parameter            | -                             |
| linear_probe     | nothing                                        | -                             |
| freeze_bottom    | layers freeze_layers..L-1 and the pooler       | -                             |
| bitfit           | every pretrained bias (Ben Zaken et al. 2021)  | -                             |
| lora             | lora_a, lora_b (Hu et al. 2021)                | lora_rank/alpha/targets/...   |
| dora             | lora_a, lora_b, dora_m (Liu et al. 2024)       | lora_* and dora               |
| adapter_houlsby  | adapters after attention and FFN (Houlsby 2019)| adapter_size                  |
| adapter_pfeiffer | adapters after the FFN (Pfeiffer et al. 2021)  | adapter_size                  |
| ia3              | ia3 scaling vectors (Liu et al. 2022)          | ia3_targets                   |
| prefix           | prefix_key, prefix_value (Li & Liang 2021)     | prefix_length                 |
| prompt           | prompt (Lester et al. 2021)                    | prompt_length                 |
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Callable

from jaxft.models.peft_layers import PeftSpec
from jaxft.peft.rules import FROZEN, PEFT_LEAF, TRAINABLE, Rule

_LAYER = re.compile(r"(?:^|/)layer_(\d+)/")


@dataclasses.dataclass(frozen=True)
class Method:
  """name; doc (one line); spec(cfg) -> dict of PeftSpec fields; rules(cfg, num_layers) -> the
  trainable rules (patterns over backbone paths)."""

  name: str
  doc: str
  spec: Callable[..., dict]
  rules: Callable[..., list[Rule]]


def _no_spec(cfg) -> dict:
  del cfg
  return {}


def _positive(cfg, field: str, method: str):
  value = cfg[field]
  if value <= 0:
    raise ValueError(f"peft.method={method} needs peft.{field} > 0, got {value}")
  return value


def _regex(cfg, field: str, method: str) -> str:
  value = cfg[field]
  if not value:
    raise ValueError(f"peft.method={method} needs a non-empty peft.{field} regex")
  try:
    re.compile(value)
  except re.error as e:
    raise ValueError(f"peft.{field}={value!r} is not a valid regex ({e})") from None
  return value


def _lora_spec(cfg, method="lora") -> dict:
  return dict(lora_rank=int(_positive(cfg, "lora_rank", method)), lora_alpha=float(cfg.lora_alpha),
              lora_dropout=float(cfg.lora_dropout),
              lora_targets=_regex(cfg, "lora_targets", method), rslora=bool(cfg.rslora))


def _target_hint(field: str, cfg) -> str:
  return (f"peft.{field}={cfg[field]!r} is searched in every Dense module path "
          f"(jaxft.models.peft_layers.Dense); no module matched, or the model was built without "
          "this PeftSpec. See the Dense module paths in the parameter list (the parts before "
          "'/kernel').")


def _full(cfg, num_layers):
  return [Rule("full", r"^backbone/", TRAINABLE, exclude=(PEFT_LEAF,))]


def _linear_probe(cfg, num_layers):
  return []


def _freeze_bottom(cfg, num_layers):
  k = int(cfg.freeze_layers)
  if not 0 <= k <= num_layers:
    raise ValueError(f"peft.freeze_layers={k} must lie in [0, num_layers={num_layers}]")
  top = "|".join(str(i) for i in range(k, num_layers))
  pattern = rf"layer_({top})|pooler" if top else "pooler"
  return [Rule("freeze_bottom", rf"^backbone/(.*/)?({pattern})/", TRAINABLE, exclude=(PEFT_LEAF,),
               hint=f"freeze_layers={k} of {num_layers} leaves no layer and no pooler to train; "
                    "use method=linear_probe to train the head alone.")]


def _bitfit(cfg, num_layers):
  return [Rule("bitfit", r"^backbone/(.*/)?bias$", TRAINABLE, exclude=(PEFT_LEAF,),
               hint="the backbone has no bias parameters.")]


def _lora(cfg, num_layers):
  return [Rule("lora", r"(^|/)lora_(a|b)$", TRAINABLE, hint=_target_hint("lora_targets", cfg))]


def _dora(cfg, num_layers):
  return [Rule("dora", r"(^|/)(lora_a|lora_b|dora_m)$", TRAINABLE,
               hint=_target_hint("lora_targets", cfg))]


def _ia3(cfg, num_layers):
  return [Rule("ia3", r"(^|/)ia3$", TRAINABLE, hint=_target_hint("ia3_targets", cfg))]


def _adapter_rules(name):
  def rules(cfg, num_layers):
    return [Rule(name, r"(^|/)adapter_(down|up)/", TRAINABLE,
                 hint="the model port never called jaxft.models.peft_layers.Adapter, or was "
                      "built without this PeftSpec.")]
  return rules


def _adapter_spec(kind):
  def spec(cfg):
    return dict(adapter_size=int(_positive(cfg, "adapter_size", f"adapter_{kind}")),
                adapter_kind=kind)
  return spec


def _prefix(cfg, num_layers):
  return [Rule("prefix", r"(^|/)prefix_(key|value)$", TRAINABLE,
               hint="the model port never called jaxft.models.peft_layers.Prefix.")]


def _prompt(cfg, num_layers):
  return [Rule("prompt", r"(^|/)prompt$", TRAINABLE,
               hint="the model port never called jaxft.models.peft_layers.Prompt.")]


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("full", "every parameter trains", _no_spec, _full),
    Method("linear_probe", "only the task head trains", _no_spec, _linear_probe),
    Method("freeze_bottom", "embeddings and the bottom peft.freeze_layers layers are frozen",
           _no_spec, _freeze_bottom),
    Method("bitfit", "bias terms train (Ben Zaken et al. 2021)", _no_spec, _bitfit),
    Method("lora", "low-rank updates W + (alpha/r) A B (Hu et al. 2021)", _lora_spec, _lora),
    Method("dora", "weight-decomposed LoRA m * V / ||V||_c (Liu et al. 2024)",
           lambda cfg: {**_lora_spec(cfg, "dora"), "dora": True}, _dora),
    Method("adapter_houlsby", "bottleneck adapters after attention and FFN (Houlsby et al. 2019)",
           _adapter_spec("houlsby"), _adapter_rules("adapter_houlsby")),
    Method("adapter_pfeiffer", "bottleneck adapters after the FFN (Pfeiffer et al. 2021)",
           _adapter_spec("pfeiffer"), _adapter_rules("adapter_pfeiffer")),
    Method("ia3", "learned output rescaling vectors (IA)^3 (Liu et al. 2022)",
           lambda cfg: {"ia3_targets": _regex(cfg, "ia3_targets", "ia3")}, _ia3),
    Method("prefix", "learned key/value prefixes per layer (Li & Liang 2021)",
           lambda cfg: {"prefix_length": int(_positive(cfg, "prefix_length", "prefix"))}, _prefix),
    Method("prompt", "learned soft prompt after [CLS] (Lester et al. 2021)",
           lambda cfg: {"prompt_length": int(_positive(cfg, "prompt_length", "prompt"))}, _prompt),
]}

# Pairs that cannot be combined: they would need two different values of one PeftSpec field.
_EXCLUSIVE = [("lora", "dora"), ("adapter_houlsby", "adapter_pfeiffer")]


def parse_method(method: str) -> tuple[str, ...]:
  """'lora+bitfit' -> ('lora', 'bitfit'); unknown names fail listing the known ones."""
  names = [n.strip().lower() for n in str(method).split("+")]
  if not method or any(not n for n in names):
    raise ValueError(f"peft.method={method!r} is empty or has an empty part; use a method name or "
                     f"a '+'-joined combination of: {', '.join(METHODS)}")
  for n in names:
    if n not in METHODS:
      close = difflib.get_close_matches(n, list(METHODS), n=1, cutoff=0.4)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ValueError(f"unknown PEFT method {n!r} in peft.method={method!r}.{hint} Known methods: "
                       f"{', '.join(METHODS)} (combine with '+', e.g. lora+bitfit)")
  if len(set(names)) != len(names):
    raise ValueError(f"peft.method={method!r} names a method twice")
  for a, b in _EXCLUSIVE:
    if a in names and b in names:
      raise ValueError(f"peft.method={method!r}: {a} and {b} cannot be combined "
                       f"({'dora already contains lora' if a == 'lora' else 'one adapter kind'})")
  return tuple(names)


def spec_from_config(cfg) -> PeftSpec:
  """config.peft (ConfigDict) -> the PeftSpec the model is built with (union over the methods)."""
  fields: dict = {}
  for name in parse_method(cfg.method):
    fields.update(METHODS[name].spec(cfg))
  return PeftSpec(**fields)


def rules_for(cfg, num_layers: int) -> list[Rule]:
  """The full rule list of config.peft: head, each method's trainable rules, the frozen rest."""
  rules = [Rule("head", r"^head/", TRAINABLE, required=False)]
  for name in parse_method(cfg.method):
    rules.extend(METHODS[name].rules(cfg, num_layers))
  # Rules over pretrained leaves (they exclude PEFT_LEAF themselves) are cut out of the frozen rule.
  pretrained = tuple(r.pattern for r in rules[1:] if PEFT_LEAF in r.exclude)
  rules.append(Rule("frozen", r"^backbone/", FROZEN, exclude=(PEFT_LEAF, *pretrained),
                    required=False))
  return rules


def check_layers(flat, num_layers: int) -> None:
  """Raises if the layer_<i> indices in the parameter paths are not exactly 0..num_layers-1."""
  found = sorted({int(m.group(1)) for p in flat for m in [_LAYER.search(p)] if m})
  if found and found != list(range(num_layers)):
    raise ValueError(f"num_layers={num_layers} but the parameters have layers {found[0]}.."
                     f"{found[-1]} ({len(found)} distinct); pass the model's num_hidden_layers")
