"""The transformer's building blocks: norm, rotary embeddings, linear (dense and INT4), MLP, mixture of
experts, attention (MHA / GQA / MQA, MLA), the tensor-parallel group. Layers call the ops in
`tinyinfer.ops`; they never import `tinyinfer.models`, which assembles them."""
