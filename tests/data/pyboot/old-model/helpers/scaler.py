class Scaler:
    def __init__(self, factor, offset):
        self.factor, self.offset = factor, offset

    def apply(self, x):
        return x * self.factor + self.offset
