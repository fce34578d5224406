#!/usr/bin/env bash
# The CPU-sized versions of the PEFT, adversarial, pruning, distillation and semi-supervised
# tables: MiniLM-L6 on movie-review polarity, one epoch each (jaxft.config.movie_reviews_cpu) unless
# a stage says otherwise, seed 0. Finished runs (results.json present) are skipped, so it resumes.
#   bash experiments/cpu_tables.sh [root=workdirs/cpu] [stage ...]
# stages: base distill adv prune peft adv2 prune2 mpnet long semi prunekd sst2 selftrain selfcontrol
# mpnetprune selftrain20 semidiag (default: all, in that order). On 2 CPU cores (measured
# 2026-11-27) the first seven take about 1 h 45 min; mpnet about 40 min (the MPNet-base teacher alone
# 20 min), long 22 min, semi 58 min, prunekd 7 min (with the teacher's logits already cached by
# mpnet), sst2 40 min (its dense run 14 min more, copied here from an earlier run of the same
# config), selftrain 15 min (its teacher is semi's labelled-only run), selfcontrol 14 min,
# mpnetprune 19 min, semidiag 13 min, selftrain20 about 25 min. The numbers and the machine they
# came from are in README ("CPU-sized tables").
set -euo pipefail
ROOT=${1:-workdirs/cpu}; shift || true
STAGES=${*:-base distill adv prune peft adv2 prune2 mpnet long semi prunekd sst2 selftrain selfcontrol mpnetprune selftrain20 semidiag}
EPS=1,2,4

train() {  # train <name> <config spec> [overrides...]
  local name=$1 spec=$2; shift 2
  if [[ -f $ROOT/$name/results.json ]]; then echo "== $name: done, skipped"; return; fi
  echo "== $name: $spec $*"
  jaxft train --config "$spec" --workdir "$ROOT/$name" "$@"
}
robust() {  # robust <name>: PGD-5 at $EPS on 512 texts and the WordNet attack on 100 texts
  [[ -f $ROOT/$1/eval_validation_best.json ]] && grep -q robustness "$ROOT/$1/eval_validation_best.json" && return
  jaxft eval --workdir "$ROOT/$1" --pgd-eps $EPS --pgd-steps 5 --pgd-examples 500 --synonym-attack 100 > /dev/null
}

for stage in $STAGES; do case $stage in
  base)
    train baseline experiments/quickstart.py
    [[ -d $ROOT/baseline/export ]] || jaxft export --workdir "$ROOT/baseline" --out "$ROOT/baseline/export"
    robust baseline ;;
  distill)
    for v in half half_alone half_tinybert; do
      train "kd-$v" "experiments/distill_mpnet_minilm.py:mr,$v" \
          "--config.distill.teacher=$ROOT/baseline/export"
    done ;;
  adv)
    train adv-fgm experiments/adversarial_glue.py:mr,fgm; robust adv-fgm ;;
  adv2)
    for o in freelb smart pgd vat; do train "adv-$o" "experiments/adversarial_glue.py:mr,$o"; robust "adv-$o"; done ;;
  prune)
    for m in magnitude movement soft_movement; do
      train "prune-$m-0.9" "experiments/prune_movement.py:$m,0.9,mr"
    done ;;
  prune2)
    for m in magnitude movement; do train "prune-$m-0.97" "experiments/prune_movement.py:$m,0.97,mr"; done
    # movement with a third of the run for the scores to learn before any weight is masked
    train prune-movement-0.9-late experiments/prune_movement.py:movement,0.9,mr \
        --config.prune.begin_fraction=0.34 --config.prune.end_fraction=0.9 ;;
  peft)
    for m in lora bitfit ia3 adapter_h8 prefix dora; do train "peft-$m" "experiments/peft_table.py:$m:mr"; done ;;
  mpnet)  # the distillation table's MPNet-base teacher, and a MiniLM-L6 student of it
    train mpnet-teacher experiments/quickstart.py --config.model.name=mpnet-base \
        --config.train.learning_rate=5e-5
    [[ -d $ROOT/mpnet-teacher/export ]] || \
        jaxft export --workdir "$ROOT/mpnet-teacher" --out "$ROOT/mpnet-teacher/export"
    train kd-mpnet-l6 experiments/distill_mpnet_minilm.py:mr \
        "--config.distill.teacher=$ROOT/mpnet-teacher/export"
    # MiniLM-L3 size: layers 0, 2, 4 of the pretrained MiniLM-L6, distilled or on labels alone
    train kd-mpnet-l3 experiments/distill_mpnet_minilm.py:mr --config.model.keep_layers=0,2,4 \
        "--config.distill.teacher=$ROOT/mpnet-teacher/export"
    train l3-alone experiments/quickstart.py --config.model.keep_layers=0,2,4 ;;
  long)  # three epochs, the first for the scores to learn before any weight is masked
    for m in movement magnitude; do
      train "prune-$m-0.9-3ep" "experiments/prune_movement.py:$m,0.9,mr" --config.train.num_epochs=3 \
          --config.prune.begin_fraction=0.34 --config.prune.end_fraction=0.8
    done ;;
  prunekd)  # magnitude pruning with distillation from the MPNet-base teacher (alpha 0.5, T 2)
    for sp in 0.9 0.97; do
      train "prune-magnitude-$sp-kd" "experiments/prune_movement.py:magnitude,$sp,mr" \
          "--config.distill.teacher=$ROOT/mpnet-teacher/export" --config.distill.own_tokenizer=true
    done ;;
  sst2)  # the pruning table's SST-2 rows: one epoch (2,104 steps of batch 32), as the MR rows
    train sst2-dense experiments/glue_small.py:sst2 --config.data.data_dir=../shared/data/glue \
        --config.train.num_epochs=1 --config.train.eval_every=1000 --config.train.log_every=200
    for m in magnitude soft_movement; do
      train "prune-$m-0.9-sst2" "experiments/prune_movement.py:$m,0.9,sst2" --config.train.num_epochs=1
    done
    # magnitude at the sparsity soft movement reached (80.8%), for a like-for-like row
    train prune-magnitude-0.81-sst2 experiments/prune_movement.py:magnitude,0.808,sst2 \
        --config.train.num_epochs=1 ;;
  semi)  # MR with 50 labels per class: labeled only vs the consistency methods, 2000 steps of batch 8
    for a in supervised fixmatch uda mean_teacher pseudo_label; do train "usb-mr100-$a" "experiments/semisup_usb.py:mr_100/$a"; done ;;
  selftrain)  # Noisy Student: 2 rounds of 1000 pseudo-labels per class, from the labelled-only run
    train usb-mr100-self_training experiments/semisup_usb.py:mr_100/self_training \
        "--config.self_training.teacher=$ROOT/usb-mr100-supervised" ;;
  selftrain20)  # the same on MR-20, with its labelled-only run
    train usb-mr20-supervised experiments/semisup_usb.py:mr_20/supervised
    train usb-mr20-self_training experiments/semisup_usb.py:mr_20/self_training \
        "--config.self_training.teacher=$ROOT/usb-mr20-supervised" ;;
  mpnetprune)  # MPNet-base (the distillation teacher's model) to 10% of its 85M encoder weights
    train prune-magnitude-0.9-mpnet experiments/prune_movement.py:magnitude,0.9,mr \
        --config.model.name=mpnet-base --config.train.learning_rate=5e-5 ;;
  selfcontrol)  # round 1's 2000 rows with their true labels; 2000 random pool rows, true labels
    for mode in same random; do
      f=$ROOT/usb-mr100-true-$mode-rows.json
      [[ -f $f ]] || python benchmarks/diag/oracle_pseudo_labels.py \
          experiments/semisup_usb.py:mr_100/supervised \
          "$ROOT/usb-mr100-self_training/pseudo_labels/round-1.json" "$f" "$mode"
      train "usb-mr100-true-$mode-rows" experiments/semisup_usb.py:mr_100/supervised \
          "--config.data.pseudo_labels=$f"
    done ;;
  semidiag)  # FixMatch on MR-100 again, logging how often its pseudo-labels are right
    train usb-mr100-fixmatch-diag experiments/semisup_usb.py:mr_100/fixmatch \
        --config.data.unlabeled_label_metrics=true ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac; done
