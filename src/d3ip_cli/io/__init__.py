"""Readers and writers: DICOM, NIfTI, NumPy volumes, measurement files, reports."""
