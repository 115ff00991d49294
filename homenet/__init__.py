"""homenet: IEC 62608 automatic configuration of home network devices."""

__version__ = "0.1.0"
DISTRIBUTION = "homenet-iec62608"
"""The name on the package index (`homenet` there is another project); `pip install` takes it."""
