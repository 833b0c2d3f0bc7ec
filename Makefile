# make demo — set up .venv; the shipped teacher (40-step base) against the shipped 1/2/4-step students on the 23
#             held-out toy prompts (ToyBench, seconds, samples/demo/compare.png); then four prompts as mp4 with
#             the 2-step student
# make test — set up .venv (CPU torch wheel if no torch is importable) and run the CPU test suite; the
#             browser test needs Chromium (make browser) and is reported as SKIPPED with the reason without it
# make browser — install Debian's chromium for the browser test (root, apt)
# make compiler — install g++ for torch.compile on the CPU, the fast path (root, apt)
# make serve — the live, steerable stream in the browser (serve.py) with the shipped toy 2-step student
# make toy  — the whole toy pipeline from the shipped base: Stage 1 TF -> Stage 2 CD -> Stage 3 DMD (2-step),
#             then ToyBench on held-out prompts and a few videos (re-running continues finished/stopped runs)
# make ablation — the paper's Table 2 on the toy world (toy_eval.py ablation): Stage 3 from the Stage-1 model,
#             causal ODE and causal CD at 1, 2 and 4 steps, as in docs/results.md (about an hour on 2 cores
#             after make toy; finished runs are reused). ABLATION_STEPS=2 runs one column.
# make world-model — the action-conditioned world model (paper §3.3, docs/world_model.md) on the toy camera
#             world: camera base -> Stage 1 TF -> Stage 2 CD -> Stage 3 DMD (2-step), then its evaluation
#             (re-running continues finished/stopped runs)
# make world-model-chunkwise — then the paper's own chunk-wise 4-step world model from the same base
ABLATION_STEPS ?= 1 2 4
VENV ?= .venv
PYTHON := $(VENV)/bin/python

DEMO_PROMPTS := --prompt "a red circle moves left quickly" --prompt "a green square moves right slowly" \
                --prompt "a blue triangle moves up quickly" --prompt "a magenta square bounces slowly"

.PHONY: setup test demo serve browser compiler toy ablation world-model world-model-chunkwise clean gpu-check

$(VENV)/.installed: requirements.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -r requirements.txt
	touch $@

setup: $(VENV)/.installed

test: $(VENV)/.installed
	$(PYTHON) -m pytest -rs tests

browser:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

compiler:
	command -v g++ >/dev/null || (apt-get update && apt-get install -y g++)

serve: $(VENV)/.installed
	$(PYTHON) serve.py

demo: $(VENV)/.installed
	mkdir -p samples/demo
	$(PYTHON) toy_eval.py compare --png samples/demo/compare.png --json samples/demo/compare.json
	$(PYTHON) sample.py $(DEMO_PROMPTS) --out samples/demo --score

toy: $(VENV)/.installed
	test -d data/toy || $(PYTHON) prepare_data.py --toy 8192 --out data/toy
	$(PYTHON) stage1_teacher_forcing.py --config configs/toy/tf.yaml --resume=true
	$(PYTHON) stage2_causal_cd.py --config configs/toy/cd.yaml --resume=true
	$(PYTHON) stage3_asym_dmd.py --config configs/toy/dmd_2step.yaml --resume=true
	$(PYTHON) toy_eval.py score --ckpt runs/toy/dmd_2step --use_ema --samples 2
	$(PYTHON) sample.py --ckpt runs/toy/dmd_2step --use_ema $(DEMO_PROMPTS) --out samples/toy --score

ablation: $(VENV)/.installed
	test -d data/toy || $(PYTHON) prepare_data.py --toy 8192 --out data/toy
	$(PYTHON) stage1_teacher_forcing.py --config configs/toy/tf.yaml --resume=true
	$(PYTHON) toy_eval.py ablation --steps $(ABLATION_STEPS) --samples 2 --json runs/toy/ablation.json

world-model: $(VENV)/.installed
	test -d data/toy_camera || $(PYTHON) prepare_data.py --toy 8192 --world camera --out data/toy_camera
	$(PYTHON) stage1_teacher_forcing.py --config configs/toy/camera_base.yaml --resume=true
	$(PYTHON) stage1_teacher_forcing.py --config configs/toy/camera_tf.yaml --resume=true
	$(PYTHON) stage2_causal_cd.py --config configs/toy/camera_cd.yaml --resume=true
	$(PYTHON) stage3_asym_dmd.py --config configs/toy/camera_dmd_2step.yaml --resume=true
	$(PYTHON) toy_eval.py camera --ckpt runs/toy/camera_dmd_2step --use_ema --samples 2

world-model-chunkwise: world-model
	$(PYTHON) stage1_teacher_forcing.py --config configs/toy/camera_tf.yaml --config configs/toy/camera_tf_chunkwise.yaml --resume=true
	$(PYTHON) stage2_causal_cd.py --config configs/toy/camera_cd.yaml --config configs/toy/camera_cd_chunkwise.yaml --resume=true
	$(PYTHON) stage3_asym_dmd.py --config configs/toy/camera_dmd_2step.yaml --config configs/toy/camera_dmd_chunkwise.yaml --resume=true
	$(PYTHON) toy_eval.py camera --ckpt runs/toy/camera_dmd_chunkwise --use_ema --steps 4 --samples 2

clean:
	rm -rf $(VENV) .pytest_cache

# make gpu-check — the GPU checks on a CUDA machine (.ci/gpu_check): Wan-shape sampler and stream benches, pytest -m gpu
gpu-check:
	.ci/gpu_check
