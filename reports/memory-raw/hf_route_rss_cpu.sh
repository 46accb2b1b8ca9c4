#!/usr/bin/env bash
# The HF route's host memory with and without the page release, beside lqplan's builder, on a 4-layer
# Llama-2-13B-shaped model, CPU. One route per process; max RSS from process start.
set -x
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD
W=${W:-/var/tmp/rss28}; M=$W/model; P=$W/plan.json
[ -f $M/config.json ] || python bench/write_shaped_model.py --shape llama2-13b --layers 4 --out $M --device cpu
[ -f $P ] || python bench/hf_load_rss.py --model $M --make-plan $P
du -sh $M
python bench/hf_load_rss.py --model $M --route lqplan --plan $P --init qlora
python bench/hf_load_rss.py --model $M --route hf --plan $P --device cpu --init qlora
python -c "
import sys, planner.hf.quantizer as q
q.release_mapped_pages = lambda *a, **k: None   # the loader as it was: no page release
sys.argv = ['hf_load_rss.py', '--model', '$M', '--route', 'hf', '--plan', '$P', '--device', 'cpu', '--init', 'qlora']
sys.path.insert(0, 'bench'); import hf_load_rss; hf_load_rss.main()"
