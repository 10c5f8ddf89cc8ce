"""Everything distributed, applied from outside to the plain model: devices, ZeRO, TP, SP."""
