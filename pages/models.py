"""Models: which checkpoints are in use, their tasks (examples, descriptions), size and device."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from engine.device import resolve_device
from pages import _shared as shared

shared.start_page("models")
st.title("Models")
st.markdown("One **pretrained** model θ₀ and several **experts** θₜ, each fine-tuned from θ₀ on one task. "
            "A *task vector* τₜ = θₜ − θ₀ is what fine-tuning changed; merging adds task vectors back to θ₀.")
act = shared.active()
shared.sync_url({})

base_numel = sum(t.numel() for t in act.stack.base.values())
base_bytes = sum(t.numel() * t.element_size() for t in act.stack.base.values())
device = resolve_device("auto")

c1, c2, c3, c4 = st.columns(4)
c1.metric("Experts (tasks)", len(act.tasks), help="Fine-tuned models that can be merged.")
c2.metric("Parameters per model", f"{base_numel / 1e6:.2f} M" if base_numel >= 1e5 else f"{base_numel:,}",
          help="Every tensor of the image encoder, as stored in the pretrained checkpoint.")
c3.metric("Size on disk (per model)", f"{base_bytes / 2**20:.1f} MiB",
          help="Memory for one copy of the weights in their stored dtype.")
c4.metric("Compute device", device.type.upper(), help="CUDA when a GPU is present, else the CPU.")
st.caption(f"Task vectors: {act.stack.numel:,} merge-eligible entries (floating-point tensors) × "
           f"{len(act.tasks)} tasks, held in one {act.stack.data.dtype} buffer of "
           f"{act.stack.data.numel() * act.stack.data.element_size() / 2**20:.1f} MiB.")

with st.expander("Where the checkpoints are", expanded=act.kind == "folder"):
    rows = [{"role": "pretrained θ₀", "task": "—", "file": str(act.source.base_path)}]
    rows += [{"role": "expert θₜ", "task": t, "file": str(p)} for t, p in zip(act.source.tasks, act.source.expert_paths)]
    st.dataframe(rows, hide_index=True, width="stretch")

st.subheader("Tasks")
if act.zoo is None:
    st.info("A local folder has no task descriptions or test sets: the Interference page works on any "
            "source, accuracy charts (Merge, Sweep) need the demo zoo.")
    for t in act.tasks:
        st.markdown(f"- **{t}**")
    st.stop()

reference = shared.reference_accuracies(act.key, act)
st.caption("Each card: what the task asks, test images (one row per class), and the top-1 accuracy of the "
           "task's own expert and of the pretrained model θ₀ on its held-out test set.")
by_name = {t.name: t for t in act.zoo.tasks}
cols_per_row = 4
task_names = act.tasks
for start in range(0, len(task_names), cols_per_row):
    cols = st.columns(cols_per_row, border=True)
    for col, name in zip(cols, task_names[start:start + cols_per_row]):
        task = by_name.get(name)
        with col:
            st.markdown(f"#### {name}")
            ind, pre = reference["individual"].get(name), reference["pretrained"].get(name)
            st.markdown(f"Expert **{'—' if ind is None else f'{ind:.1f} %'}** · pretrained "
                        f"**{'—' if pre is None else f'{pre:.1f} %'}**",
                        help="Top-1 accuracy on the task's test set: its own fine-tuned expert, and θ₀ "
                             "before any fine-tuning.")
            if task is not None:
                st.write(task.description)
                examples = act.zoo.examples_path(name) if task.examples_file else None
                if examples is not None and examples.is_file():
                    st.image(str(examples), width="stretch")
                classes = list(task.classes)
                shown = ", ".join(map(str, classes[:12])) + (" …" if len(classes) > 12 else "")
                st.caption(f"{len(classes)} classes, one row each: {shown}")

config = getattr(act.zoo, "model_config", None) or {}
if config:
    kw = config.get("kwargs", {})
    st.subheader("Model")
    arch = ", ".join(f"{label} {kw[key]}" for key, label in (("image_size", "image size"),
                                                                ("patch_size", "patch size"), ("width", "width"),
                                                                ("layers", "layers"), ("heads", "heads"),
                                                                ("output_dim", "embedding dim")) if key in kw)
    st.markdown(f"A CLIP-style vision transformer ({config.get('class', 'VisionTransformer')}): {arch}. "
                "Each task has a frozen zero-shot head (one unit vector per class); fine-tuning changed only "
                "the encoder, so the experts can be merged weight by weight.")
    with st.expander("Full model configuration"):
        st.json(config)
