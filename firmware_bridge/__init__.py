"""The serial wire protocol between sensor firmware and the gateway (both sides).

Never imports `gateway`: firmware tooling and the simulated device use it alone.
"""
