#!/usr/bin/env bash
# Train the tiny world's models from scratch on one GPU and pack them into models/tiny_world/
# (about 9 minutes on an H200), then benchmark them. Every stage is a `fastwan` command; the VAE and
# teacher train for a fixed wall-clock budget (seconds below), so numbers vary slightly by card.
# Run from the repository root:  bash scripts/train_tiny_world.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=runs/tiny_world  # the paths in training/configs/tiny_world.toml
FASTWAN="${FASTWAN:-fastwan}"
if [ -e "$RUN" ]; then
    # distill would resume the old run's checkpoints instead of training from scratch
    echo "train_tiny_world: $RUN exists from an earlier run; move or delete it to train from scratch" >&2
    exit 2
fi
$FASTWAN world-vae --out $RUN/vae --steps 4000 --time-limit "${VAE_SECONDS:-75}"
$FASTWAN world-teacher --vae $RUN/vae --out $RUN/teacher_model --steps 8000 --time-limit "${TEACHER_SECONDS:-160}" --pool 1024
$FASTWAN world-prompts --out $RUN/prompts.txt --count 192 --seed 0
$FASTWAN synth --prompts $RUN/prompts.txt --model $RUN/teacher_model --out $RUN/data --width 256 --height 192 \
    --frames 29 --steps 20 --guidance 4.5 --shift 5 --negative-prompt "" --samples-per-shard 64
# SIGTERM after the budget: the trainer finishes the step and saves a checkpoint.
timeout -s TERM "${DISTILL_SECONDS:-100}" $FASTWAN distill --config training/configs/tiny_world.toml || true
$FASTWAN export --run $RUN/distill --out $RUN/student.safetensors
# The control: the same run with the fake score frozen (learning rate 1e-30).
timeout -s TERM "${DISTILL_SECONDS:-100}" $FASTWAN distill --config training/configs/tiny_world.toml \
    --set train.output_dir=$RUN/control --set optimizer.fake_score_lr=1e-30 || true
$FASTWAN export --run $RUN/control --out $RUN/control.safetensors
$FASTWAN world-pack --teacher-model $RUN/teacher_model --student $RUN/student.safetensors --out models/tiny_world
python bench/tiny_world.py --models models/tiny_world --control $RUN/control.safetensors | tee $RUN/bench.json
