set -o pipefail
export JAX_PLATFORMS=cuda,cpu XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,driver_version --format=csv | tee $OUT/env.txt
python -c "import jax,flax,torch,transformers,triton;print(jax.__version__,flax.__version__,torch.__version__,transformers.__version__,triton.__version__)" | tee -a $OUT/env.txt
timeout 200 python benchmarks/ssd.py --parts ssd --quick --shapes Nemotron,Falcon,Codestral,"2.7B b16" --out $OUT/ssd.json 2>&1 | tee $OUT/ssd.log
timeout 150 python -m pytest -q -x -m gpu tests/test_kernels_pallas.py -k ssd 2>&1 | tail -15 | tee $OUT/gputests.log
timeout 420 python benchmarks/generate.py --shapes nemotron-h-8b --batches 1,16 --new 64 --repeats 2 --impls easymamba,transformers --out $OUT/gen_nemotron.json 2>&1 | tee $OUT/gen_nemotron.log
