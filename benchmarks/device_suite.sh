# Benchmark steps of scripts/device_check.sh (sourced there: uses its `step`, $PY and $OUTDIR).
# About 5 minutes on one H100 in all; each run stops starting workloads after its
# --time-budget and always prints and saves what it measured.  Results land in
# $OUTDIR/results/<device-slug>_<date>_<suite>.json + .png: copy them to benchmarks/results/,
# commit, and run scripts/render_results.py.
mkdir -p "$OUTDIR/results"
# Inference, bf16 channels_last: ResNet-50 whole model, then every distinct ResNet-18/-50
# block at batch 256 and 64; eager vs fused backends, max-autotune on one shape.
step bench-quick 240 $PY -m fusedres bench --suite gpu-quick --device cuda \
  --compile-on "bottleneck_1024-256-s1_14x14/b256" --time-budget 120 \
  --results-dir "$OUTDIR/results" --csv "$OUTDIR/bench-quick.csv" --summary "$OUTDIR/bench-quick.summary"
# Training step, bf16 AMP channels_last: ResNet-50 and -18 at batch 256 and 128, img/s and
# peak memory; torch.compile (default) on ResNet-50 batch 256 only.
step bench-train 200 $PY -m fusedres bench --suite gpu-train --device cuda --time-budget 90 \
  --results-dir "$OUTDIR/results" --csv "$OUTDIR/bench-train.csv" --summary "$OUTDIR/bench-train.summary"
