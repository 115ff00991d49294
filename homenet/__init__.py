"""homenet: IEC 62608 automatic configuration of home network devices."""

__version__ = "0.1.0"
