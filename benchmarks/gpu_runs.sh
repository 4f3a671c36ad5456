#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md, in groups that each fit a 10-minute window:
#
#   benchmarks/gpu_runs.sh GROUP [OUTDIR]   (several: benchmarks/gpu_runs.sh 'speed flags' OUTDIR)
#   GROUP: speed, flags, memory, more (fp32, batch 512), input (TensorFlow needed), profile
#
# Each line is one `python -m resnet_jax.bench ... --json` process (its own compile, its own peak
# memory); the JSON results go to OUTDIR/<group>.jsonl and the logs to OUTDIR/<group>.log.
# `python -m resnet_jax.bench --markdown OUTDIR/*.jsonl` turns them into the tables.
# XLA_PYTHON_CLIENT_PREALLOCATE=false: JAX allocates what it uses, so the whole GPU is available
# to the memory runs and torch can share it in the --compare runs (peak_bytes_in_use is the same).
set -u
groups=${1:?usage: $0 speed|flags|memory|more|input|profile [OUTDIR]}
out=${2:-runs/gpu}
if [ "$(wc -w <<<"$groups")" -gt 1 ]; then
  for g in $groups; do "$0" "$g" "$out"; done
  exit
fi
group=$groups
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
r50=(--model=resnet50 --batch_size=256 --half_precision)

case $group in
  speed)  # ours (default XLA GPU flags) vs the Linen baseline vs torch eager, interleaved
    runs=(
      "${r50[*]} --xla_gpu_flags --compare --steps=20 --repeats=3"
      "${r50[*]} --s2d_stem --xla_gpu_flags --compare --no_torch --steps=20 --repeats=3 --no_eval"
      "--model=cifar_resnet56 --batch_size=128 --half_precision --xla_gpu_flags --compare --steps=50 --repeats=3 --no_eval"
    ) ;;
  flags)  # one change at a time from plain XLA defaults, ours only
    runs=(
      "${r50[*]} --steps=20 --repeats=2 --no_eval"
      "${r50[*]} --xla_gpu_flags --steps=20 --repeats=2 --no_eval"
      "${r50[*]} --xla_gpu_flags --xla_flags=--xla_gpu_enable_command_buffer= --steps=20 --repeats=2 --no_eval"
      "${r50[*]} --xla_gpu_flags --xla_flags=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE --steps=20 --repeats=2 --no_eval"
      "${r50[*]} --xla_gpu_flags --bn_group_size=32 --steps=20 --repeats=2 --no_eval"
    ) ;;
  memory)  # remat: memory saved and the fits the issue asks for; compile time with depth
    runs=(
      "--model=cifar_resnet110 --batch_size=128 --half_precision --steps=0"
      "--model=cifar_resnet1202 --batch_size=128 --half_precision --steps=0"
      "--model=cifar_resnet1202 --batch_size=128 --half_precision --remat_compare --steps=3 --no_eval"
      "--model=resnet152 --batch_size=256 --half_precision --remat_compare --steps=3 --no_eval"
      "${r50[*]} --remat_compare --steps=5 --no_eval"
    ) ;;
  more)  # the other precision and a larger batch, against the Linen baseline
    runs=(
      "--model=resnet50 --batch_size=256 --xla_gpu_flags --compare --steps=10 --repeats=3 --no_eval"
      "--model=resnet50 --batch_size=512 --half_precision --xla_gpu_flags --compare --no_torch --steps=10 --repeats=3 --no_eval"
    ) ;;
  input)  # the tf.data pipeline against the step: fed vs on-device batches, and the pipelines alone
    runs=(
      "${r50[*]} --xla_gpu_flags --input_fed --ip_images=512 --steps=20 --repeats=3 --no_eval"
      "--model=cifar_resnet56 --batch_size=128 --half_precision --xla_gpu_flags --input_fed --ip_images=2048 --steps=50 --repeats=3 --no_eval"
      "--input_pipeline --ip_images=512 --ip_batches=40"
      "--input_pipeline --cores=1 --ip_batches=10"
    ) ;;
  profile)  # A/B variants of our step on the GPU (benchmarks/profile_step.py), not the bench CLI
    export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true"
    for v in "--model=resnet50 --half_precision --batch_size=256 --steps=20 --repeats=3 --variants=ours,ours_dot_1x1,ours_dot_1x1_triton,ours_select_guard,linen" \
             "--model=cifar_resnet56 --half_precision --batch_size=128 --steps=50 --repeats=3 --variants=ours,ours_select_guard,ours_no_guard,linen"; do
      echo "== profile_step.py $v" | tee -a "$out/$group.log"
      # shellcheck disable=SC2086
      timeout 400 "$py" benchmarks/profile_step.py $v >"$out/one.txt" 2>>"$out/$group.log" || echo "FAILED ($?): $v" | tee -a "$out/$group.log"
      tee -a "$out/$group.log" <"$out/one.txt"
      grep '^{' "$out/one.txt" >>"$out/$group.jsonl"
    done
    rm -f "$out/one.txt"
    exit ;;
  *) echo "unknown group $group: speed, flags, memory, more, input or profile" >&2; exit 2 ;;
esac

for r in "${runs[@]}"; do
  echo "== $r" | tee -a "$out/$group.log"
  # shellcheck disable=SC2086
  if timeout 300 "$py" -m resnet_jax.bench $r --json >"$out/one.txt" 2>>"$out/$group.log"; then
    tail -n 1 "$out/one.txt" >>"$out/$group.jsonl"
    head -n -1 "$out/one.txt" | tee -a "$out/$group.log"
  else
    echo "FAILED ($?): $r" | tee -a "$out/$group.log"
    tail -n 5 "$out/$group.log"
  fi
done
rm -f "$out/one.txt"
