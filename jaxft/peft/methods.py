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
| freeze_bottom    | layers freeze_layers..L-1, pooler, final norm  | -                             |
| bitfit           | every pretrained bias (Ben Zaken et al. 2021)  | -                             |
| lora             | lora_a, lora_b (Hu et al. 2021)                | lora_rank/alpha/targets/...   |
| dora             | lora_a, lora_b, dora_m (Liu et al. 2024)       | lora_* and dora               |
| adapter_houlsby  | adapters after attention and FFN (Houlsby 2019)| adapter_size                  |
| adapter_pfeiffer | adapters after the FFN (Pfeiffer et al. 2021)  | adapter_size                  |
| ia3              | ia3 scaling vectors (Liu et al. 2022)          | ia3_targets                   |
| prefix           | prefix_key, prefix_value (Li & Liang 2021)     | prefix_length                 |
| prompt           | prompt (Lester et al. 2021)                    | prompt_length                 |

Learning rates. A method that adds or picks a small set of leaves needs a much larger rate than
full fine-tuning, so each one carries a default (`Method.learning_rate`, its source in `_RATES`)
that applies when peft.learning_rate is 0; an explicit peft.learning_rate wins. full and
freeze_bottom train pretrained weights at train.learning_rate. How the rates reach the optimizer:
`jaxft.train.optim.learning_rates`.

LoRA targets: `peft.lora_targets` is a preset of `LORA_TARGETS` (qv, attention, all-linear, each
naming the projections of every family) or a regex over the Dense module paths.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Callable

from jaxft.models.peft_layers import LORA_INITS, PeftSpec
from jaxft.peft.rules import FROZEN, PEFT_LEAF, TRAINABLE, Rule

_LAYER = re.compile(r"(?:^|/)layer_(\d+)/")


@dataclasses.dataclass(frozen=True)
class Method:
  """name; doc (one line); spec(cfg) -> dict of PeftSpec fields; rules(cfg, num_layers) -> the
  trainable rules (patterns over backbone paths); learning_rate: the default peak rate of the
  leaves the rules claim (None: they train at train.learning_rate)."""

  name: str
  doc: str
  spec: Callable[..., dict]
  rules: Callable[..., list[Rule]]
  learning_rate: float | None = None


# Default peak learning rates (AdamW, warmup then linear decay, batch 32) and where they come from.
# "MR quickstart" = experiments/quickstart.py (all-MiniLM-L6-v2, one epoch of movie reviews, 298
# steps, 2 CPU cores) with only --config.peft.method=<m>; accuracy on its 1,060 held-out reviews.
_RATES = {
    # Only the freshly initialised head trains: Adam's own default, 1e-3 (Kingma & Ba 2015); not
    # measured here.
    "linear_probe": 1e-3,
    # Hu et al. 2021, Table 9 (RoBERTa-base, GLUE): 4e-4 - 5e-4 at alpha = r = 8 (scale 1),
    # batch 16, 25-80 epochs. jaxft's default alpha = 16 doubles the scale, and one short epoch
    # wants a larger step. Measured here on the MR quickstart (r 8, alpha 16, q/v, 2026-11-30):
    # 1e-3 -> 81.9% (1e-4 -> 57.5%; 5e-4 at alpha 8, experiments/peft_table.py:lora:mr -> 78.8%).
    "lora": 1e-3,
    # Liu et al. 2024 train DoRA with LoRA's hyperparameters; LoRA's default (not measured here).
    "dora": 1e-3,
    # Ben Zaken et al. 2021: BERT on GLUE, rates searched in {1e-4, 4e-4, 7e-4, 1e-3} over several
    # epochs; one epoch wants more. Measured here on the MR quickstart (2026-11-30): 3e-3 -> 80.0%
    # (1e-4 -> 52.0%; 1e-3, experiments/peft_table.py:bitfit:mr -> 75.9%).
    "bitfit": 3e-3,
    # Houlsby et al. 2019 sweep {3e-5, 3e-4, 3e-3} per task; 3e-4, their middle value (and the one
    # experiments/peft_table.py uses); not measured here.
    "adapter_houlsby": 3e-4,
    "adapter_pfeiffer": 3e-4,
    # Liu et al. 2022 (T-Few): 3e-3 (Adafactor, T0-3B); not measured here.
    "ia3": 3e-3,
    # Liu et al. 2022 (P-Tuning v2): deep prompts without reparameterisation on BERT / RoBERTa NLU
    # train at rates around 5e-3 - 1e-2; the lower end (not measured here).
    "prefix": 5e-3,
    # Lester et al. 2021 use 0.3 with Adafactor (T5); with AdamW 3e-2 is the usual choice (Hugging
    # Face PEFT's prompt-tuning examples); not measured here.
    "prompt": 3e-2,
}


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


# LoRA target presets: regexes over Dense module paths naming, in every family, BERT-likes (BERT,
# RoBERTa, ELECTRA, ViT: attention/self|attention/{query,key,value}, attention/output/dense,
# intermediate/dense, layer_i/output/dense), DistilBERT (attention/{q,k,v,out}_lin, ffn/lin1|2),
# MPNet (attention/attn/{q,k,v,o}, intermediate/dense, output/dense), ModernBERT (attn/Wqkv,
# attn/Wo, mlp/Wi, mlp/Wo) and DeBERTa (attention/self/{query,key,value}_proj, BERT's output and
# FFN names; all-linear adds pos_{key,query}_proj, its relative-position projections). ModernBERT
# projects q, k and v with one fused kernel, which a Dense hook cannot split, so its "qv" is LoRA
# on the whole attn/Wqkv (the key projection adapts too; the same choice as "attention" minus Wo).
# The pooler and the head are plain nn.Dense layers and never carry LoRA.
_QV = r"(^|/)(query|value|q_lin|v_lin|q|v|query_proj|value_proj)$|(^|/)attn/Wqkv$"
_ATTENTION = (r"(^|/)(query|key|value|q_lin|k_lin|v_lin|out_lin|q|k|v|o|query_proj|key_proj|"
              r"value_proj)$"
              r"|(^|/)attention/output/dense$|(^|/)attn/(Wqkv|Wo)$")
_FFN = r"(^|/)intermediate/dense$|(^|/)layer_\d+/output/dense$|(^|/)ffn/lin(1|2)$|(^|/)mlp/(Wi|Wo)$"
_POSITION = r"(^|/)pos_(key|query)_proj$"
LORA_TARGETS = {
    "qv": _QV,  # Hu et al. 2021's choice for RoBERTa / DeBERTa on GLUE
    "attention": _ATTENTION,  # W_q, W_k, W_v, W_o
    # QLoRA's (Dettmers et al. 2023) every linear layer
    "all-linear": f"{_ATTENTION}|{_FFN}|{_POSITION}",
}


def lora_targets(value: str) -> str:
  """peft.lora_targets -> the regex: a preset name of LORA_TARGETS, else the value itself."""
  return LORA_TARGETS.get(value.strip().lower(), value) if value else value


def _lora_spec(cfg, method="lora") -> dict:
  targets = lora_targets(cfg.lora_targets)
  if not targets:
    raise ValueError(f"peft.method={method} needs peft.lora_targets: a preset "
                     f"({', '.join(LORA_TARGETS)}) or a regex")
  try:
    re.compile(targets)
  except re.error as e:
    raise ValueError(f"peft.lora_targets={cfg.lora_targets!r} is not a preset "
                     f"({', '.join(LORA_TARGETS)}) and not a valid regex ({e})") from None
  init = str(cfg.lora_init or "default")
  if init not in LORA_INITS:
    raise ValueError(f"peft.lora_init={init!r}; known: {', '.join(LORA_INITS)}")
  return dict(lora_rank=int(_positive(cfg, "lora_rank", method)), lora_alpha=float(cfg.lora_alpha),
              lora_dropout=float(cfg.lora_dropout), lora_targets=targets,
              rslora=bool(cfg.rslora), lora_init=init)


def _target_hint(field: str, cfg) -> str:
  presets = (f" Or use a preset: {', '.join(LORA_TARGETS)}." if field == "lora_targets" else "")
  return (f"peft.{field}={cfg[field]!r} is searched in every Dense module path "
          f"(jaxft.models.peft_layers.Dense); no module matched, or the model was built without "
          "this PeftSpec. See the Dense module paths in the parameter list (the parts before "
          f"'/kernel').{presets}")


def _full(cfg, num_layers):
  return [Rule("full", r"^backbone/", TRAINABLE, exclude=(PEFT_LEAF,))]


def _linear_probe(cfg, num_layers):
  return []


def _freeze_bottom(cfg, num_layers):
  k = int(cfg.freeze_layers)
  if not 0 <= k <= num_layers:
    raise ValueError(f"peft.freeze_layers={k} must lie in [0, num_layers={num_layers}]")
  top = "|".join(str(i) for i in range(k, num_layers))
  # A pre-LN encoder's final norm (ModernBERT's final_norm) belongs with the top layer.
  pattern = rf"layer_({top})|pooler|final_norm" if top else "pooler"
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
    Method("linear_probe", "only the task head trains", _no_spec, _linear_probe,
           _RATES["linear_probe"]),
    Method("freeze_bottom", "embeddings and the bottom peft.freeze_layers layers are frozen",
           _no_spec, _freeze_bottom),
    Method("bitfit", "bias terms train (Ben Zaken et al. 2021)", _no_spec, _bitfit,
           _RATES["bitfit"]),
    Method("lora", "low-rank updates W + (alpha/r) A B (Hu et al. 2021)", _lora_spec, _lora,
           _RATES["lora"]),
    Method("dora", "weight-decomposed LoRA m * V / ||V||_c (Liu et al. 2024)",
           lambda cfg: {**_lora_spec(cfg, "dora"), "dora": True}, _dora, _RATES["dora"]),
    Method("adapter_houlsby", "bottleneck adapters after attention and FFN (Houlsby et al. 2019)",
           _adapter_spec("houlsby"), _adapter_rules("adapter_houlsby"),
           _RATES["adapter_houlsby"]),
    Method("adapter_pfeiffer", "bottleneck adapters after the FFN (Pfeiffer et al. 2021)",
           _adapter_spec("pfeiffer"), _adapter_rules("adapter_pfeiffer"),
           _RATES["adapter_pfeiffer"]),
    Method("ia3", "learned output rescaling vectors (IA)^3 (Liu et al. 2022)",
           lambda cfg: {"ia3_targets": _regex(cfg, "ia3_targets", "ia3")}, _ia3, _RATES["ia3"]),
    Method("prefix", "learned key/value prefixes per layer (Li & Liang 2021)",
           lambda cfg: {"prefix_length": int(_positive(cfg, "prefix_length", "prefix"))}, _prefix,
           _RATES["prefix"]),
    Method("prompt", "learned soft prompt after [CLS] (Lester et al. 2021)",
           lambda cfg: {"prompt_length": int(_positive(cfg, "prompt_length", "prompt"))}, _prompt,
           _RATES["prompt"]),
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


def method_learning_rate(cfg, name: str) -> float | None:
  """The peak rate of the leaves method `name` trains: peft.learning_rate when set (> 0), else the
  method's default (METHODS[name].learning_rate); None for methods that train pretrained weights
  at train.learning_rate (full, freeze_bottom)."""
  default = METHODS[name].learning_rate
  if default is None:
    return None
  return float(cfg.learning_rate) if cfg.learning_rate > 0 else default


def main_learning_rate(cfg) -> float | None:
  """The rate a PEFT run is led by: that of the first method of config.peft.method that has one,
  or None when a method of the combination trains pretrained weights at train.learning_rate (full,
  freeze_bottom: the run stays led by train.learning_rate). The head trains at
  it unless train.head_learning_rate is set, and the logged `lr` follows it."""
  names = parse_method(cfg.method)
  rates = [method_learning_rate(cfg, n) for n in names]
  if any(r is None for r in rates):
    return None
  return next((r for r in rates if r is not None), None)


def leaf_methods(cfg, paths) -> dict[str, str | None]:
  """path -> the first method of config.peft.method (in the order written) that has its own
  learning rate and whose rules train the path; None for every other path (head, pretrained
  weights trained by full / freeze_bottom, leaves parts add)."""
  rated = [(n, METHODS[n].rules(cfg, 0)) for n in parse_method(cfg.method)
           if METHODS[n].learning_rate is not None]
  out = {}
  for p in paths:
    out[p] = next((n for n, rules in rated if any(r.matches(p) for r in rules)), None)
  return out
