"""Per-device linear calibration; instances are pickled into calibration.pkl."""


class Calibration:
    def __init__(self, gains: dict, default_gain: float = 1.0, offset: float = 0.0):
        self.gains, self.default_gain, self.offset = gains, default_gain, offset

    def apply(self, device: str, value: float) -> float:
        return value * self.gains.get(device, self.default_gain) + self.offset
