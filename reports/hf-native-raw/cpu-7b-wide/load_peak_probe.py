# Where from_pretrained(quantization_config=LqplanConfig) peaks in host RSS (CPU run of reports/hf-native.md):
# a 5 ms RSS sampler labelled with the weight being quantized. Run: python load_peak_probe.py (venv of the project)
import resource, torch, time, threading
from transformers import AutoModelForCausalLM
from planner.hf import LqplanConfig
from planner.hf import quantizer as Q
def cur():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"): return int(line.split()[1]) // 1024
peak = [0, ""]
stage = [""]
def sampler():
    while True:
        r = cur()
        if r > peak[0]: peak[0], peak[1] = r, stage[0]
        time.sleep(0.005)
threading.Thread(target=sampler, daemon=True).start()
orig = Q.LqplanHfQuantizer.quantize_weight
def qw(self, model, key, value):
    stage[0] = f"in quantize {key}"
    out = orig(self, model, key, value)
    stage[0] = f"after {key}"
    return out
Q.LqplanHfQuantizer.quantize_weight = qw
m = AutoModelForCausalLM.from_pretrained("/tmp/hf7b-model", quantization_config=LqplanConfig(plan="/tmp/hf7b/hf-plan/plan.json"), dtype=torch.float32)
time.sleep(0.1)
print("final", cur(), "peak", peak, "maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
