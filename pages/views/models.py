"""Models: which checkpoints are in use, their tasks (examples, classes, accuracies), size and device."""
from __future__ import annotations

import streamlit as st

from engine.device import resolve_device
from pages.ui import calls, sections, state

state.start_page("models")
st.title("Models")
st.markdown("One **pretrained** model θ₀ and several **experts** θₜ, each fine-tuned from θ₀ on one task. "
            "A *task vector* τₜ = θₜ − θ₀ is what fine-tuning changed; merging adds task vectors back to θ₀.")
state.sync_url({})
act = sections.active()

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
if act.stack.kept_from_base:
    st.caption("Kept at the pretrained values in every merge (no expert checkpoint has them): "
               + ", ".join(f"`{n}`" for n in act.stack.kept_from_base) + ".")

with st.expander("Where the checkpoints are", expanded=act.kind != "zoo"):
    rows = [{"role": "pretrained θ₀", "task": "—", "file": str(act.source.base_path)}]
    rows += [{"role": "expert θₜ", "task": t, "file": str(p)} for t, p in zip(act.source.tasks, act.source.expert_paths)]
    st.dataframe(rows, hide_index=True, width="stretch")

st.subheader("Tasks")
if not act.can_evaluate:
    st.info("A checkpoint folder has no task descriptions or test images: the Interference page and the merged "
            "checkpoint's download work on it; accuracy (Merge, Sweep, Continual) needs test images, which a suite "
            "file names for the same checkpoints (docs/suites.md).")
    for t in act.tasks:
        st.markdown(f"- **{t}**")
    st.stop()

reference = calls.reference_accuracies(act)
st.caption("Each card: what the task asks, its classes, and the top-1 accuracy of the task's own expert and of the "
           "pretrained model θ₀ on its held-out test images.")
sections.budget_caption(act)
suite = act.suite
cols_per_row = 4
for start in range(0, len(act.tasks), cols_per_row):
    cols = st.columns(cols_per_row, border=True)
    for col, name in zip(cols, act.tasks[start:start + cols_per_row]):
        with col:
            st.markdown(f"#### {name}")
            ind, pre = reference["individual"].get(name), reference["pretrained"].get(name)
            st.markdown(f"Expert **{'—' if ind is None else f'{ind:.1f} %'}** · pretrained "
                        f"**{'—' if pre is None else f'{pre:.1f} %'}**",
                        help="Top-1 accuracy on the task's test images: its own fine-tuned expert, and θ₀ "
                             "before any fine-tuning.")
            description = suite.description(name)
            if description:
                st.write(description)
            zoo = getattr(suite, "zoo", None)
            if zoo is not None:
                examples = zoo.examples_path(name)
                if examples.is_file():
                    st.image(str(examples), width="stretch")
            classes = suite.classes(name)
            shown = ", ".join(map(str, classes[:12])) + (" …" if len(classes) > 12 else "")
            st.caption(f"{len(classes)} classes" + (", one row each" if zoo is not None else "") + f": {shown}")

zoo = getattr(suite, "zoo", None)
if zoo is not None:
    config = zoo.model_config
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
else:
    clip = suite.clip
    st.subheader("Model")
    st.markdown(f"CLIP `{clip.arch}` at {clip.image_size} px. Each task's head is built from its class names and "
                "prompt templates with the CLIP text tower (zero-shot), cached on disk; the experts change only "
                "the image encoder, so they can be merged weight by weight.")
