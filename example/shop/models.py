"""A tiny shop: orders come in batches, and jobs write their receipts and a report per batch."""

from django.db import models
from django.utils import timezone


class Order(models.Model):
    number = models.CharField(max_length=20, unique=True)
    batch = models.CharField(max_length=100, db_index=True, help_text="Import batch.")
    customer = models.CharField(max_length=100)
    total = models.DecimalField(max_digits=10, decimal_places=2)
    created_at = models.DateTimeField(default=timezone.now)
    warehouse_notified_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"order {self.number}"


class Receipt(models.Model):
    order = models.OneToOneField(Order, on_delete=models.CASCADE, related_name="receipt")
    number = models.CharField(max_length=20, unique=True)
    total = models.DecimalField(max_digits=10, decimal_places=2)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"receipt {self.number}"


class SalesReport(models.Model):
    batch = models.CharField(max_length=100)
    orders = models.PositiveIntegerField()
    receipts = models.PositiveIntegerField()
    revenue = models.DecimalField(max_digits=12, decimal_places=2)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"report on {self.batch}"
