# ruff: noqa
import cProfile, pstats, torch
from accel_patch.kernels import apply_rope, rms_norm
dt=torch.bfloat16
q=torch.randn(1,1,8,64,device="cuda",dtype=dt).transpose(1,2).requires_grad_()
k=torch.randn(1,1,2,64,device="cuda",dtype=dt).transpose(1,2).requires_grad_()
cos=torch.randn(1,1,64,device="cuda",dtype=dt); sin=torch.randn_like(cos)
def step():
    qo,ko=apply_rope(q,k,cos,sin); torch.autograd.backward([qo,ko],[torch.ones_like(qo),torch.ones_like(ko)])
for _ in range(100): step()
pr=cProfile.Profile(); pr.enable()
for _ in range(1000): step()
torch.cuda.synchronize(); pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(25)
