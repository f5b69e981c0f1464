"""Data path: filesystem, feature map, prepare, stage store, synthetic stream."""
