"""Energy per image from the operation counts: E = E_AC · SynOps + E_MAC · (first-layer MACs).

A synaptic operation of a spike is one accumulate (AC); the first layer sees the real-valued
image, so its operations are multiply-accumulates (MAC). The default costs are those of 45 nm,
32-bit floating point (Horowitz 2014): E_AC = 0.9 pJ, E_MAC = 4.6 pJ (``logging.energy_ac_pj``,
``logging.energy_mac_pj``), the same as SpikingJelly's ``SimpleEnergyCostConfig``. Memory access,
neuron state updates and other analog layers are not counted (``docs/metrics.md``).
"""

from __future__ import annotations

E_AC_PJ = 0.9
E_MAC_PJ = 4.6


def energy_uj(synops: float | None, first_layer_macs: float | None, ac_pj: float = E_AC_PJ,
              mac_pj: float = E_MAC_PJ) -> float | None:
    """Microjoules per image; None when either count is missing."""
    if synops is None or first_layer_macs is None:
        return None
    return (ac_pj * synops + mac_pj * first_layer_macs) * 1e-6
