// Multi-tensor apply (apex / PyTorch's fused optimizers): one register
// program over up to {{ sets }} tensor sets per launch, grid row y = set.
// Each set's operand pointers, result pointers (null: a result nobody
// reads), element count and scalar mask (bit j: operand j is read at 0)
// travel by value. Every element reads its operands before any result is
// written, so a result may overwrite the state it updates (in place).
// Launch: grid (blocks of the largest set, sets), 256 threads.
struct tsr_sets_{{ sets }} {
    const void* x[{{ sets }}][{{ arity }}];
    void* out[{{ sets }}][{{ results }}];
    i64 numel[{{ sets }}];
    u32 scalar[{{ sets }}];
};
{% if scalars > 0 %}struct tsr_scalars_{{ scalars }} { float v[{{ scalars }}]; };{% endif %}

TSR_GLOBAL void {{ name }}({{ signature }}) {
    const unsigned set = blockIdx.y;
    const i64 n = sets.numel[set];
    const u32 scalar = sets.scalar[set];
{% for t in in_types %}    const {{ t }}* x{{ loop.index0 }} = (const {{ t }}*)sets.x[set][{{ loop.index0 }}];
{% endfor %}{% for r in range(end=results) %}    {{ out_type }}* out{{ r }} = ({{ out_type }}*)sets.out[set][{{ r }}];
{% endfor %}    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
{{ body }}
    }
}
