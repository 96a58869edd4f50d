"""Core types shared by every layer: volumes, measurements, errors, devices, configs."""
