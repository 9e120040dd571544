"""Encode one saved input with whichever ``ps3`` package this interpreter has; report time/memory.

Runs unchanged under this project's environment and under upstream PS3's own environment
(both packages are imported as ``ps3`` with the same API), so the two are measured the same
way. Ties in upstream's top-k are broken lower-index-first, this project's rule.
"""

import argparse
import json
import resource
import time

import torch


def stable_topk(self, k, dim=-1, largest=True, sorted=True):
    values, indices = torch.sort(self, dim=dim, descending=largest, stable=True)
    k = int(k)
    return torch.return_types.topk((values.narrow(dim, 0, k), indices.narrow(dim, 0, k)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--num-look-close", default="1")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.Tensor.topk = stable_topk
    from ps3 import PS3VisionModel

    looks = args.num_look_close if args.num_look_close == "all" else int(args.num_look_close)
    model = PS3VisionModel.from_pretrained(args.model).eval()
    model.vision_model.num_hidden_layers_to_return = 1
    x = torch.load(args.input)
    loaded_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    with torch.no_grad():
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = model(x, num_look_close=looks)
            times.append(time.perf_counter() - start)
    torch.save({"last_hidden_state": out.last_hidden_state, "selection_maps": list(out.selection_maps)}, args.output)
    print(json.dumps({
        "seconds": sorted(times)[len(times) // 2],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_after_load_mb": loaded_mb,
        "tokens": out.last_hidden_state.shape[1],
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
