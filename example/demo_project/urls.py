"""URLs of the example project: only the admin, where the jobs can be browsed."""

from django.contrib import admin
from django.urls import path

urlpatterns = [
    path("admin/", admin.site.urls),
]
