"""The bench's picture: achieved bandwidth per case and peer against the copy ceiling.

One horizontal bar per peer (fastreg into reused outputs, fastreg fresh,
PyTorch, NumPy) for every forward and backward case, in GB/s over the case's
minimal byte count, with the machine's measured copy bandwidth as a vertical
line. Needs matplotlib (the ``bench`` extra); drawn off screen (Agg).
"""

PEER_COLORS = {"fastreg": "#1b6ca8", "fastreg fresh": "#7fb3d5", "torch": "#e67e22",
               "numpy": "#95a5a6"}


def plot_bandwidth(rows, ceiling_gbs, path, title):
    """Write a PNG to ``path``; rows are the bench's result rows (fwd and bwd only)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [r for r in rows if r.get("direction") in ("fwd", "bwd") and "ms" in r]
    peers = [p for p in PEER_COLORS if any(p in r["ms"] for r in cases)]
    height = 0.8 / max(len(peers), 1)
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(cases) * max(len(peers), 1) / 2 + 1.5))
    for k, peer in enumerate(peers):
        ys, gbs = [], []
        for i, r in enumerate(cases):
            ms = r["ms"].get(peer)
            if ms:
                ys.append(i + (k - (len(peers) - 1) / 2) * height)
                gbs.append(r["bytes"] / ms / 1e6)
        ax.barh(ys, gbs, height=height, color=PEER_COLORS[peer], label=peer)
    ax.axvline(ceiling_gbs, color="black", linestyle="--", linewidth=1,
               label=f"copy ceiling {ceiling_gbs:.1f} GB/s")
    ax.set_yticks(range(len(cases)))
    ax.set_yticklabels([f"{r['op']} {r['direction']} {'x'.join(map(str, r['shape']))} "
                        f"{r['layout']} {r['dtype']}" for r in cases], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("GB/s over the minimal bytes (each input read once, each output written once)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
