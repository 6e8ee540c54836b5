from django.contrib import admin

from shop.models import Order, Receipt, SalesReport


@admin.register(Order)
class OrderAdmin(admin.ModelAdmin):
    list_display = ["number", "batch", "customer", "total", "warehouse_notified_at"]
    list_filter = ["batch"]


@admin.register(Receipt)
class ReceiptAdmin(admin.ModelAdmin):
    list_display = ["number", "order", "total", "created_at"]


@admin.register(SalesReport)
class SalesReportAdmin(admin.ModelAdmin):
    list_display = ["batch", "orders", "receipts", "revenue", "created_at"]
