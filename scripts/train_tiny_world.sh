#!/usr/bin/env bash
# Train the tiny world's models from scratch on one GPU and pack them into models/tiny_world/
# (about 9 minutes on an H100/H200), then benchmark them. Every stage is a `fastwan` command; the VAE,
# the teacher and the two distillations train for a fixed wall-clock budget (seconds below), so the
# numbers vary slightly by card.
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
# Stops here (exit status 2) when the judge cannot read the VAE's reconstructions: a teacher trained on
# latents without objects draws none. The message says how to go on training that VAE (--init).
$FASTWAN world-vae --out $RUN/vae --steps 40000 --time-limit "${VAE_SECONDS:-180}" --batch 8 --min-adherence 90
$FASTWAN world-teacher --vae $RUN/vae --out $RUN/teacher_model --steps 40000 --time-limit "${TEACHER_SECONDS:-200}" \
    --pool 1024
$FASTWAN world-prompts --out $RUN/prompts.txt --count 192 --seed 0
$FASTWAN synth --prompts $RUN/prompts.txt --model $RUN/teacher_model --out $RUN/data --width 256 --height 192 \
    --frames 29 --steps 20 --guidance 4.5 --shift 5 --negative-prompt "" --samples-per-shard 64
# The student and, beside it on the same GPU, the control: the same run with the fake score frozen
# (learning rate 1e-30). SIGTERM after the budget: the trainer finishes the step and saves a checkpoint.
timeout -s TERM "${DISTILL_SECONDS:-90}" $FASTWAN distill --config training/configs/tiny_world.toml &
timeout -s TERM "${DISTILL_SECONDS:-90}" $FASTWAN distill --config training/configs/tiny_world.toml \
    --set train.output_dir=$RUN/control --set optimizer.fake_score_lr=1e-30 &
wait
$FASTWAN export --run $RUN/distill --out $RUN/student.safetensors
$FASTWAN export --run $RUN/control --out $RUN/control.safetensors
$FASTWAN world-pack --teacher-model $RUN/teacher_model --student $RUN/student.safetensors --out models/tiny_world
python bench/tiny_world.py --models models/tiny_world --control $RUN/control.safetensors | tee $RUN/bench.json
