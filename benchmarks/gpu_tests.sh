# The test suite on the lent GPU machine (CUDA accelerator, NCCL, aio on a real disk):
#   run(command="bash benchmarks/gpu_tests.sh", carry=[".whl", ".deb", ".device"])
# after `bash ../shared/device/prepare.sh hypothesis sortedcontainers attrs` here. Writes $OUT/junit.xml.
set -o pipefail
source .device/bootstrap.sh || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
t=$(date +%s)
python -c "from deepspeed.ops.op_builder import AsyncIOBuilder; AsyncIOBuilder().load()" > $OUT/build_aio.log 2>&1 &
python -c "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()" > $OUT/build_fa.log 2>&1 &
python -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" > $OUT/build_ca.log 2>&1 &
wait; echo builds $(( $(date +%s)-t ))s
tail -n 2 $OUT/build_*.log
# fp16 cases skip where the accelerator lacks fp16 (CPU on AMD); here they must run, not skip.
export NVME_TIER_REQUIRE_FP16=1
timeout ${LIMIT:-420} python -m pytest -q -p no:cacheprovider -m "not multiproc" -W ignore -rfE --junitxml=$OUT/junit.xml "$@" 2>&1 | grep -v "^\[20" > $OUT/gpu_tests.log
echo pytest rc=$?
tail -60 $OUT/gpu_tests.log
