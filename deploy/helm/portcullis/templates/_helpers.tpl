{{/* The objects' name: the release name when it says portcullis, else <release>-portcullis. */}}
{{- define "portcullis.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "portcullis.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "portcullis.labels" -}}
{{ include "portcullis.selectorLabels" . }}
app.kubernetes.io/part-of: portcullis
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* "auto": on when the cluster serves the Prometheus Operator's API; otherwise the value. */}}
{{- define "portcullis.monitoringOn" -}}
{{- $v := index . 0 -}}{{- $ctx := index . 1 -}}
{{- if eq (toString $v) "auto" -}}
{{- if $ctx.Capabilities.APIVersions.Has "monitoring.coreos.com/v1" -}}true{{- end -}}
{{- else if $v -}}true{{- end -}}
{{- end -}}

{{/* The shared store's URL (never with a password: that comes from store.secret's file). */}}
{{- define "portcullis.storeURL" -}}
{{- $s := .Values.store -}}
{{- if $s.url -}}{{ $s.url }}
{{- else if $s.host -}}
{{- printf "%s://%s:%v/%v" (ternary "rediss" "redis" $s.tls) $s.host $s.port $s.db -}}
{{- end -}}
{{- end -}}

{{- define "portcullis.publicNamespaces" -}}
{{- if .Values.namespaced -}}*
{{- else if .Values.policy.publicNamespaces -}}{{ join "," .Values.policy.publicNamespaces }}
{{- else -}}{{ .Release.Namespace }}
{{- end -}}
{{- end -}}
