{{/* Chart name, truncated to the 63 characters Kubernetes names allow. */}}
{{- define "creditd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects. */}}
{{- define "creditd.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "creditd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "creditd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "creditd.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "creditd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "creditd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "creditd.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding CREDITD_DATABASE_URL, CREDITD_REDIS_URL and CREDITD_ADMIN_TOKEN. */}}
{{- define "creditd.secretName" -}}
{{- default (include "creditd.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{- define "creditd.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* CREDITD_LISTEN: loopback only in the sidecar form, all interfaces otherwise. */}}
{{- define "creditd.listen" -}}
{{- if .Values.config.listen }}
{{- .Values.config.listen }}
{{- else if .Values.sidecar.enabled }}
{{- "127.0.0.1:50051" }}
{{- else }}
{{- "0.0.0.0:50051" }}
{{- end }}
{{- end }}

{{- define "creditd.grpcPort" -}}
{{- include "creditd.listen" . | splitList ":" | last }}
{{- end }}

{{/* "true" when creditd listens on loopback only; the kubelet then cannot reach it for probes. */}}
{{- define "creditd.loopback" -}}
{{- $host := include "creditd.listen" . | trimSuffix (printf ":%s" (include "creditd.grpcPort" .)) }}
{{- if or (hasPrefix "127." $host) (eq $host "localhost") (eq $host "[::1]") }}true{{ end }}
{{- end }}

{{/*
A probe on creditd's gRPC health service; the argument is (list $ "service-name").
Kubelet probes dial the pod IP, so when creditd listens on loopback only (the sidecar
form) the probe runs `python -m creditd.healthcheck` inside the container instead.
*/}}
{{- define "creditd.probe" -}}
{{- $root := index . 0 }}
{{- $service := index . 1 }}
{{- if include "creditd.loopback" $root }}
exec:
  command: [python, -m, creditd.healthcheck, {{ include "creditd.listen" $root | quote }}, {{ $service | quote }}]
{{- else }}
grpc:
  port: {{ include "creditd.grpcPort" $root }}
  service: {{ $service | quote }}
{{- end }}
{{- end }}

{{/* "true" when creditd runs on its embedded store: no database URL and no Secret of yours. */}}
{{- define "creditd.embedded" -}}
{{- if not (or .Values.secrets.existingSecret .Values.secrets.databaseUrl) }}true{{ end }}
{{- end }}

{{/* Settings the chart cannot serve: fail at render time, before anything starts. */}}
{{- define "creditd.check" -}}
{{- if gt (int .Values.replicaCount) 1 }}
{{- if include "creditd.embedded" . }}
{{- fail "replicaCount > 1 needs a shared database: set secrets.databaseUrl and secrets.redisUrl (or secrets.existingSecret); the embedded store serves one replica" }}
{{- end }}
{{- if and (not .Values.secrets.existingSecret) (not .Values.secrets.redisUrl) }}
{{- fail "replicaCount > 1 needs secrets.redisUrl: without Redis each replica would keep balances of its own" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The pods' grace period: the drain plus a margin to write out what creditd holds. */}}
{{- define "creditd.terminationGracePeriodSeconds" -}}
{{- if ne (toString .Values.terminationGracePeriodSeconds) "" }}
{{- .Values.terminationGracePeriodSeconds }}
{{- else }}
{{- add (int (default 30 .Values.config.drainSeconds)) (int .Values.shutdownMarginSeconds) }}
{{- end }}
{{- end }}
