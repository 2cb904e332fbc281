#!/usr/bin/env bash
# GPU check: the paths that CPU tests cannot run, each for a few optimizer steps of GPT-2 124M at context 1024 on
# the shipped corpus, one line per case: ok or failed, tokens/s, MFU, peak GPU memory, wall time.
#
#   bash benchmarks/gpu_check.sh                 # every case on this machine's GPUs (~4 min on one H100)
#   bash benchmarks/gpu_check.sh --list          # the cases and their overrides, nothing run (works without a GPU)
#   bash benchmarks/gpu_check.sh --dry-run       # the exact commands, nothing run
#   options: --gpus N (default: all visible), --steps N (20), --batch-size N (8 per GPU), --out DIR (a temp dir),
#            --timeout S (per case, 300), --python PATH (python)
#
# Cases: bf16 on one GPU; the same with torch.compile; DDP over all GPUs; FSDP over all GPUs (trainer=fsdp: one
# shard unit per block, activation checkpointing). Each run ends as a real one does (final validation on 2 batches,
# last.ckpt, the export), so the FSDP case also checks the gathered export. Logs: <out>/<case>.log.
set -uo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

gpus="" steps=20 batch=8 out="" timeout_s=300 python=python mode=run
while [ $# -gt 0 ]; do
  case "$1" in
    --list) mode=list ;;
    --dry-run) mode=dry-run ;;
    --gpus) gpus="$2"; shift ;;
    --steps) steps="$2"; shift ;;
    --batch-size) batch="$2"; shift ;;
    --out) out="$2"; shift ;;
    --timeout) timeout_s="$2"; shift ;;
    --python) python="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for value in "$steps" "$batch" "$timeout_s" ${gpus:+"$gpus"}; do
  case "$value" in ''|*[!0-9]*) echo "error: '$value' is not a whole number (see --help)" >&2; exit 2 ;; esac
done

if [ -z "$gpus" ]; then
  if [ "$mode" = run ]; then
    gpus=$("$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
  else
    gpus=N  # --list / --dry-run without --gpus: all visible GPUs, whatever their number
  fi
fi
if [ "$mode" = run ] && [ "$gpus" -lt 1 ]; then
  echo "error: no CUDA GPU visible to $python: this check needs at least one (--list shows the cases)" >&2
  exit 1
fi
if [ -z "$out" ]; then
  if [ "$mode" = run ]; then out=$(mktemp -d -t gpu_check.XXXXXX); else out="<a temp dir>"; fi
fi

common=(model=gpt124m data=embedded data.tokenizer=gpt2 data.context_length=1024 "data.batch_size=$batch"
        "trainer.max_steps=$steps" trainer.val_check_interval=100000 trainer.limit_val_batches=2
        trainer.log_every_n_steps=5 scheduler.warmup_steps=5 checkpoint_every=100000 callbacks.progress_bar=null)
names=(bf16 bf16-compile ddp fsdp)
overrides=(
  "trainer.accelerator=gpu trainer.devices=1 trainer.precision=bf16-mixed"
  "trainer.accelerator=gpu trainer.devices=1 trainer.precision=bf16-mixed perf.compile=true"
  "trainer.accelerator=gpu trainer.devices=$gpus trainer.strategy=ddp trainer.precision=bf16-mixed"
  "trainer=fsdp trainer.devices=$gpus trainer.precision=bf16-mixed"
)

command_of() {  # the command line of case $1
  echo "$python -m llmtrain ${common[*]} ${overrides[$1]} hydra.run.dir=$out/${names[$1]}"
}

if [ "$mode" = list ]; then
  for i in "${!names[@]}"; do printf '%-13s %s\n' "${names[$i]}" "${overrides[$i]}"; done
  echo "every case: ${common[*]}"
  exit 0
fi
if [ "$mode" = dry-run ]; then
  for i in "${!names[@]}"; do command_of "$i"; done
  exit 0
fi

echo "gpu_check: $gpus GPU(s): $("$python" -c 'import torch; print(torch.cuda.get_device_name())'); logs in $out"
printf '%-13s %-7s %12s %7s %14s %8s\n' case result tokens/s MFU "peak memory" seconds
failed=0
for i in "${!names[@]}"; do
  log="$out/${names[$i]}.log"
  start=$(date +%s)
  # shellcheck disable=SC2046  # the command is split into words on purpose
  timeout "$timeout_s" $(command_of "$i") >"$log" 2>&1
  status=$?
  seconds=$(( $(date +%s) - start ))
  line=$(grep -m1 -o 'throughput: .*' "$log")
  rate=$(sed -n 's/^throughput: \([0-9,]*\) tokens\/s.*/\1/p' <<<"$line")
  mfu=$(sed -n 's/.*MFU \([0-9.]*%\).*/\1/p' <<<"$line")
  memory=$(sed -n 's/.*peak memory \([0-9.]* GiB\).*/\1/p' <<<"$line")
  if [ "$status" -eq 0 ] && grep -q '^done: ' "$log"; then
    result=ok
  else
    result=failed failed=$((failed + 1))
    [ "$status" -eq 124 ] && result=timeout
  fi
  printf '%-13s %-7s %12s %7s %14s %8s\n' "${names[$i]}" "$result" "${rate:--}" "${mfu:--}" "${memory:--}" "$seconds"
  if [ "$result" != ok ]; then
    echo "  last lines of $log:"; tail -n 3 "$log" | sed 's/^/    /'
  fi
done
exit $(( failed > 0 ))
