#!/usr/bin/env bash
# The main job: write handwritten digits as WebDataset shards, train a small ViT image tower against
# all-MiniLM-L6-v2 (locked except its last layer and the projection), and report zero-shot accuracy
# on held-out digits. About a minute of training on 2 CPU cores: the locked layers (frozen whole, layer
# norms included) run once per distinct caption and are then read from the lock cache.
#
#   bash examples/train_digits.sh [DATA_DIR] [LOG_DIR]
set -euo pipefail
DATA=${1:-data/digits}
LOGS=${2:-logs}

clipkit data digits --force "$DATA"   # a rerun rewrites the same files
clipkit-train \
    --model "$DATA/digits-minilm.json" \
    --train-data "$DATA/train/{00000..00005}.tar" \
    --zeroshot-data "$DATA/test/00000.tar" \
    --zeroshot-classnames "$DATA/classnames.txt" \
    --zeroshot-templates "$DATA/templates.txt" \
    --zeroshot-frequency 5 --save-frequency 5 \
    --lock-text --lock-text-unlocked-layers 1 --lock-text-freeze-layer-norm \
    --batch-size 64 --epochs 15 --lr 5e-4 --warmup 10 --wd 0.1 \
    --precision fp32 --device cpu --workers 2 \
    --logs "$LOGS" --report-to tensorboard --log-every-n-steps 11
