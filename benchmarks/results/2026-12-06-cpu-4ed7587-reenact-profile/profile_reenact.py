import sys, torch
torch.set_num_threads(1)
from head4d import bench
from head4d.bench.harness import prepare, step
from torch.profiler import profile, ProfilerActivity
CPU=torch.device("cpu")
case=bench.cases(bench.Settings(device=CPU, full=True), ["reconstructor_reenact"])[0]
print("case:", case.op, case.shape)
inp=prepare(case, case.make_inputs(CPU,0),"fwd")
for backend in ("torch","cpu"):
    f=step(case,"fwd",backend); f(inp); f(inp)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        f(inp)
    print(f"== backend {backend}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
